"""image_cnn: a small CNN over each event's image -> one vector per event, masked."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dynemb.dims import Dims
from dynemb.serving.cache import RowCache, cached_rows, row_keys
from dynemb.specs import StageSpec, TensorSpec
from dynemb.stages.base import RunnerOptions
from dynemb.stages.torch_stage import RowCacheRunner, TorchStage
from dynemb.tensors import Tensors

if TYPE_CHECKING:
    from torch import nn

    from dynemb.manifest import Manifest
    from dynemb.serving.runtime import Runtime


@dataclass(frozen=True)
class ImageCNNParams:
    width: int = 32  # channels of the first conv block (then 2x)


class ImageRunner(RowCacheRunner):
    """Each distinct image of the batch through the runtime once, and not at all when the
    cache has it (keyed by a digest of its pixels); events without an image get the
    learned "no image" vector."""

    cache_name = "image"

    def __init__(
        self, spec: StageSpec, manifest: Manifest, runtime: Runtime, cache: RowCache | None
    ) -> None:
        super().__init__(spec, manifest, runtime, cache)
        s = manifest.dims.image_size
        none = {"IMAGE_PIXELS": np.zeros((1, 3, s, s), np.uint8), "IMAGE_MASK": np.zeros(1, bool)}
        self.missing = runtime(none)[0]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels, mask = inputs["IMAGE_PIXELS"], inputs["IMAGE_MASK"]
        users, events = mask.shape
        pixels, mask = pixels.reshape(users * events, *pixels.shape[2:]), mask.reshape(-1)
        out = np.repeat(self.missing[None], users * events, axis=0)
        real = np.flatnonzero(mask)
        if real.size:
            images = pixels[real]
            keep = np.ones(len(real), bool)
            out[real] = cached_rows(
                row_keys(images, digest=True),
                lambda rows: self.runtime({"IMAGE_PIXELS": images[rows], "IMAGE_MASK": keep[rows]}),
                self.cache,
            )
        return {"IMAGE_VEC": out.reshape(users, events, -1)}


class ImageCNNStage(TorchStage):
    name = "image_cnn"
    description = "CNN, masked"
    params_type = ImageCNNParams
    # ~0.5 kB an image with Python's overhead (a digest key and a 64-float row).
    options = RunnerOptions(runtime="onnxruntime", cache_entries=100_000, cache_mb=64)
    row_runner = ImageRunner

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return (t.image_pixels, t.image_mask), (t.image_vec,)

    def network(self, dims: Dims, params: ImageCNNParams) -> nn.Module:
        from dynemb.stages.image_cnn.network import ImageCNN

        return ImageCNN(dims, params)

    def served(self, network: nn.Module) -> nn.Module:
        from dynemb.stages.image_cnn.network import ImageRows

        return ImageRows(network)

    def stage_function(self, network: nn.Module) -> nn.Module:
        from dynemb.stages.image_cnn.network import ImageEvents

        return ImageEvents(network)

    def example_inputs(self, dims: Dims) -> dict[str, np.ndarray]:
        s = dims.image_size
        pixels = np.random.default_rng(0).integers(0, 256, (2, 3, s, s), dtype=np.uint8)
        return {"IMAGE_PIXELS": pixels, "IMAGE_MASK": np.array([True, False])}


STAGE = ImageCNNStage()
