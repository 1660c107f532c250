"""label_mlp: embedding-bag of each event's label ids -> MLP -> one vector per event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dynemb.dims import Dims
from dynemb.serving import checks
from dynemb.serving.cache import cached_rows, row_keys
from dynemb.specs import TensorSpec
from dynemb.stages.base import RunnerOptions
from dynemb.stages.torch_stage import RowCacheRunner, TorchStage
from dynemb.tensors import Tensors

if TYPE_CHECKING:
    from torch import nn

    from dynemb.manifest import Manifest


@dataclass(frozen=True)
class LabelMLPParams:
    n_labels: int  # size of the label vocabulary (preprocess's), padding and unknown included
    bag_dim: int | None = None  # width of the label embeddings; None = 2 x label_dim


class LabelRunner(RowCacheRunner):
    """Each distinct label set of the batch through the runtime once (padded events
    included: their empty set is one more row), and not at all when cached."""

    cache_name = "labels"

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = inputs["LABEL_IDS"]
        users, events, labels = ids.shape
        rows = ids.reshape(-1, labels)
        out = cached_rows(
            row_keys(rows), lambda first: self.runtime({"LABEL_IDS": rows[first]}), self.cache
        )
        return {"LABEL_VEC": out.reshape(users, events, -1)}

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        STAGE.check_inputs(self.manifest, inputs)


class LabelMLPStage(TorchStage):
    name = "label_mlp"
    description = "embedding-bag + MLP"
    params_type = LabelMLPParams
    # ~0.5 kB a label set with Python's overhead.
    options = RunnerOptions(runtime="onnxruntime", cache_entries=100_000, cache_mb=64)
    row_runner = LabelRunner

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return (t.label_ids,), (t.label_vec,)

    def network(self, dims: Dims, params: LabelMLPParams) -> nn.Module:
        from dynemb.stages.label_mlp.network import LabelMLP

        return LabelMLP(dims, params)

    def served(self, network: nn.Module) -> nn.Module:
        from dynemb.stages.label_mlp.network import LabelRows

        return LabelRows(network)

    def stage_function(self, network: nn.Module) -> nn.Module:
        from dynemb.stages.label_mlp.network import LabelEvents

        return LabelEvents(network)

    def check_inputs(self, manifest: Manifest, inputs: dict[str, np.ndarray]) -> None:
        checks.in_range("LABEL_IDS", inputs["LABEL_IDS"], 0, manifest.hparams.n_labels)

    def example_inputs(self, dims: Dims) -> dict[str, np.ndarray]:
        ids = np.zeros((2, dims.max_labels), np.int64)
        ids[0, :2] = [1, 1]  # UNK: every vocabulary has it (one built from no labels, no more)
        return {"LABEL_IDS": ids}


STAGE = LabelMLPStage()
