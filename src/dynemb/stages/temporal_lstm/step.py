"""temporal_lstm one step at a time, for sessions: `TemporalLSTM.extend` from a stored
state, optionally through ONNX Runtime.

The ONNX function is exported from the loaded weights when the session engine loads
(no artifact of its own) and covers the usual batch, where every user reads the same
number of new events (one each, as events stream in); other batches take the torch
path, which packs the sequences. A parity test holds the two together.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F

from dynemb.manifest import Manifest
from dynemb.stages.temporal_lstm.network import TemporalLSTM

State = tuple[torch.Tensor, torch.Tensor]


class LSTMStep:
    def __init__(self, network: TemporalLSTM) -> None:
        self.network = network.eval()
        self._onnx = None

    @classmethod
    def load(cls, directory: Path, manifest: Manifest, runtime: str = "torch") -> LSTMStep:
        from dynemb import stages
        from dynemb.serving.runtime import on_runtime

        step = cls(stages.get("temporal_lstm").load_network(directory, manifest))
        return on_runtime(step, runtime, "temporal_lstm step")

    def use_onnxruntime(self) -> None:
        from dynemb.serving.runtime import OnnxFunction

        d = self.network.dims
        users, new = 2, 1
        example = {
            "text_vec": torch.randn(users, new, d.text_dim),
            "image_vec": torch.randn(users, new, d.image_dim),
            "label_vec": torch.randn(users, new, d.label_dim),
            "time_features": torch.randn(users, new, d.time_dim),
            "h0": torch.randn(users, d.seq_dim),
            "c0": torch.randn(users, d.seq_dim),
        }
        per_event = {0: "users", 1: "new"}
        dynamic = {name: per_event for name in list(example)[:4]}
        dynamic |= {"h0": {0: "users"}, "c0": {0: "users"}, "seq_features": per_event}
        dynamic |= {"h": {0: "users"}, "c": {0: "users"}}
        self._onnx = OnnxFunction(
            LSTMSteps(self.network), example, ("seq_features", "h", "c"), dynamic
        )

    def extend(
        self,
        text_vec: torch.Tensor,
        image_vec: torch.Tensor,
        label_vec: torch.Tensor,
        time_features: torch.Tensor,
        event_mask: torch.Tensor,
        state: State,
    ) -> tuple[torch.Tensor, State]:
        """As `TemporalLSTM.extend`."""
        new = event_mask.shape[1]
        if self._onnx is not None and new and bool(event_mask.all()):
            seq, h, c = self._onnx(
                text_vec=text_vec.numpy(),
                image_vec=image_vec.numpy(),
                label_vec=label_vec.numpy(),
                time_features=time_features.numpy(),
                h0=state[0].numpy(),
                c0=state[1].numpy(),
            )
            return torch.from_numpy(seq), (torch.from_numpy(h), torch.from_numpy(c))
        return self.network.extend(text_vec, image_vec, label_vec, time_features, event_mask, state)


class LSTMSteps(torch.nn.Module):
    """`TemporalLSTM.extend` for batches whose every event is real, for the export."""

    def __init__(self, network: TemporalLSTM) -> None:
        super().__init__()
        self.network = network

    def forward(self, text_vec, image_vec, label_vec, time_features, h0, c0):
        n = self.network
        x = torch.cat([text_vec, image_vec, label_vec, time_features], dim=-1)
        states, (h, c) = n.lstm(F.gelu(n.inp(x)), (h0[None].contiguous(), c0[None].contiguous()))
        return n.norm(states), h[0], c[0]
