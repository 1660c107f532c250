"""image_cnn: a small CNN over each event's image -> one vector per event, masked."""

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
class ImageCNNParams:
    width: int = 32  # channels of the first conv block (then 2x)


class ImageCNNStage(TorchStage):
    name = "image_cnn"
    description = "CNN, masked"
    params_type = ImageCNNParams

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return (t.image_pixels, t.image_mask), (t.image_vec,)

    def network(self, dims: Dims, params: ImageCNNParams) -> nn.Module:
        from dynemb.stages.image_cnn.network import ImageCNN

        return ImageCNN(dims, params)


STAGE = ImageCNNStage()
