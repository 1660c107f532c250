"""label_mlp: embedding-bag of each event's label ids -> MLP -> one vector per event."""

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
class LabelMLPParams:
    n_labels: int  # size of the label vocabulary (preprocess's), padding and unknown included
    bag_dim: int | None = None  # width of the label embeddings; None = 2 x label_dim


class LabelMLPStage(TorchStage):
    name = "label_mlp"
    description = "embedding-bag + MLP"
    params_type = LabelMLPParams

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return (t.label_ids,), (t.label_vec,)

    def network(self, dims: Dims, params: LabelMLPParams) -> nn.Module:
        from dynemb.stages.label_mlp.network import LabelMLP

        return LabelMLP(dims, params)


STAGE = LabelMLPStage()
