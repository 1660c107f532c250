"""temporal_lstm: an LSTM over the event sequence -> F_t, one state per event."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dynemb.dims import Dims
from dynemb.stages.temporal_lstm import TemporalLSTMParams


class TemporalLSTM(nn.Module):
    """Reads G = text ⊕ image ⊕ label with the time features of each event, oldest first.

    Padding sits after the real events and the LSTM is causal, so real states never see
    padding; padded positions are zeroed on the way out.
    """

    def __init__(self, dims: Dims, params: TemporalLSTMParams) -> None:
        super().__init__()
        self.dims = dims
        self.inp = nn.Linear(dims.event_dim + dims.time_dim, dims.seq_dim)
        self.lstm = nn.LSTM(dims.seq_dim, dims.seq_dim, batch_first=True)
        self.norm = nn.LayerNorm(dims.seq_dim)

    def forward(
        self,
        text_vec: torch.Tensor,
        image_vec: torch.Tensor,
        label_vec: torch.Tensor,
        time_features: torch.Tensor,
        event_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, L, *) per-event tensors, (B, L) mask -> (B, L, seq_dim)."""
        x = torch.cat([text_vec, image_vec, label_vec, time_features], dim=-1)
        states, _ = self.lstm(F.gelu(self.inp(x)))
        return self.norm(states) * event_mask.unsqueeze(-1).to(states.dtype)

    def extend(
        self,
        text_vec: torch.Tensor,
        image_vec: torch.Tensor,
        label_vec: torch.Tensor,
        time_features: torch.Tensor,
        event_mask: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The next events (B, K, *) of users whose LSTM state (h, c) (B, seq_dim) each is
        `state`: their F_t (B, K, seq_dim), as `forward` over the whole sequence computes
        them, and each user's state after its last real event (`event_mask`, real first;
        a user with none keeps its state)."""
        x = torch.cat([text_vec, image_vec, label_vec, time_features], dim=-1)
        lengths = event_mask.sum(1)
        h0, c0 = (s[None].contiguous() for s in state)
        if bool((lengths == x.shape[1]).all()):
            states, (h, c) = self.lstm(F.gelu(self.inp(x)), (h0, c0))
        else:
            packed = nn.utils.rnn.pack_padded_sequence(
                F.gelu(self.inp(x)), lengths.clamp(min=1).cpu(), True, enforce_sorted=False
            )
            out, (h, c) = self.lstm(packed, (h0, c0))
            states, _ = nn.utils.rnn.pad_packed_sequence(out, True, total_length=x.shape[1])
            none = lengths == 0
            h[0, none], c[0, none] = state[0][none], state[1][none]
        out = self.norm(states) * event_mask.unsqueeze(-1).to(states.dtype)
        return out, (h[0], c[0])
