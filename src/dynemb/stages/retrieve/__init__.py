"""retrieve: top-K of E_t · v + b over the item table (numpy only: no torch in its process).

The item table is built at `dynemb build` by running every catalogue item's content
through the same preprocess/text/image/label stages and the item tower (`table.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dynemb.dims import Dims
from dynemb.serving import checks
from dynemb.specs import StageSpec, TensorSpec
from dynemb.stages.base import CandidateChange, ExportContext, Runner, RunnerOptions, Stage
from dynemb.stages.retrieve.items import ItemTable, Retriever, check_top_k
from dynemb.tensors import Tensors
from dynemb_client import contract as wire

if TYPE_CHECKING:
    from dynemb.manifest import Manifest


EMBEDDING_LIMIT = 1e6  # per element of USER_EMBEDDING: scores stay finite in float32


@dataclass(frozen=True)
class RetrieveParams:
    n_items: int


class RetrieveRunner(Runner):
    def __init__(self, spec: StageSpec, manifest: Manifest, table: ItemTable) -> None:
        super().__init__(spec, manifest)
        self.retriever = Retriever(table, manifest.dims.max_top_k)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.retriever(inputs[wire.USER_EMBEDDING])

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        # E_t is unit-norm; a caller's own vector may be scaled, but not to overflow scores.
        checks.bounded(wire.USER_EMBEDDING, inputs[wire.USER_EMBEDDING], EMBEDDING_LIMIT)
        check_top_k(inputs[wire.TOP_K], self.manifest.dims.max_top_k)

    def trim(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict:
        """Up to k items: all of them where the catalogue holds fewer (TOP_K is checked
        against the contract's limit, which a client can know, not the catalogue's size)."""
        k = check_top_k(inputs[wire.TOP_K], self.manifest.dims.max_top_k)
        return {name: value[:, : min(k, self.retriever.max_k)] for name, value in outputs.items()}


class RetrieveStage(Stage):
    name = "retrieve"
    description = "top-K of E_t · v + b over the item table"
    params_type = RetrieveParams
    candidate_kinds = ("perturb", "nan", "signature")

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return (t.user_embedding, t.top_k), (t.item_ids, t.item_scores, t.item_titles)

    def probe_inputs(self, dims: Dims) -> dict[str, np.ndarray]:
        inputs = super().probe_inputs(dims)
        inputs[wire.TOP_K][:] = 1  # k = 0 is bad input
        return inputs

    def export(self, context: ExportContext, directory: Path) -> RetrieveParams:
        from dynemb.stages.retrieve.table import build_item_table

        table = build_item_table(context.checkpoint, context.catalogue)
        table.save(directory)
        return RetrieveParams(len(table.ids))

    def runner(self, directory: Path, manifest: Manifest, options: RunnerOptions) -> Runner:
        return RetrieveRunner(self.spec(manifest.dims), manifest, ItemTable.load(directory))

    def change(self, directory: Path, manifest: Manifest, change: CandidateChange) -> None:
        table = ItemTable.load(directory)
        rng = np.random.default_rng(change.seed)
        vectors = table.vectors + change.scale * rng.standard_normal(table.vectors.shape)
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        if change.kind == "nan":
            vectors[0, 0] = np.nan
        ItemTable(table.ids, table.titles, vectors, table.bias).save(directory)


STAGE = RetrieveStage()
