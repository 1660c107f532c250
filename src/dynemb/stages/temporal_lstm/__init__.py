"""temporal_lstm: an LSTM over the event sequence -> F_t, one state per event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dynemb.dims import Dims
from dynemb.specs import TensorSpec
from dynemb.stages.torch_stage import TorchStage
from dynemb.tensors import Tensors

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class TemporalLSTMParams:
    """No free hyperparameters: its widths are the dims' (event_dim + time_dim -> seq_dim)."""


class TemporalLSTMStage(TorchStage):
    name = "temporal_lstm"
    description = "LSTM over events -> F_t"
    event_tensors = (
        "TEXT_VEC",
        "IMAGE_VEC",
        "LABEL_VEC",
        "TIME_FEATURES",
        "EVENT_MASK",
        "SEQ_FEATURES",
    )
    sequence_mask = "EVENT_MASK"
    params_type = TemporalLSTMParams

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return (t.text_vec, t.image_vec, t.label_vec, t.time_features, t.event_mask), (
            t.seq_features,
        )

    def network(self, dims: Dims, params: TemporalLSTMParams) -> nn.Module:
        from dynemb.stages.temporal_lstm.network import TemporalLSTM

        return TemporalLSTM(dims, params)


STAGE = TemporalLSTMStage()
