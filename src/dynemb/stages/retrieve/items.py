"""The item table and the scoring behind `retrieve` (numpy only: no torch in its process)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from dynemb.errors import InputError
from dynemb_client import contract as wire


@dataclass
class ItemTable:
    """Unit-norm item vectors in E_t's space and a score bias per item (the item tower's,
    zeros for a model without one), with the ids and titles clients see."""

    ids: list[str]
    titles: list[str]
    vectors: np.ndarray  # (n_items, embed_dim) float32
    bias: np.ndarray | None = None  # (n_items,) float32; None = zeros

    def __post_init__(self) -> None:
        if self.bias is None:
            self.bias = np.zeros(len(self.vectors), np.float32)
        if self.bias.shape != (len(self.vectors),):
            raise ValueError(f"{self.bias.shape[0]} biases for {len(self.vectors)} vectors")

    VECTORS: ClassVar[str] = "item_table.npy"
    BIAS: ClassVar[str] = "item_bias.npy"
    ITEMS: ClassVar[str] = "items.json"

    def save(self, directory: Path) -> None:
        np.save(directory / self.VECTORS, self.vectors.astype(np.float32))
        np.save(directory / self.BIAS, np.asarray(self.bias, np.float32))
        items = {"ids": self.ids, "titles": self.titles}
        (directory / self.ITEMS).write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> ItemTable:
        items = json.loads((directory / cls.ITEMS).read_text(encoding="utf-8"))
        vectors = np.load(directory / cls.VECTORS)
        if vectors.shape[0] != len(items["ids"]):
            raise ValueError(f"{directory}: {vectors.shape[0]} vectors for {len(items['ids'])} ids")
        bias_path = directory / cls.BIAS
        bias = np.load(bias_path) if bias_path.exists() else None
        return cls(items["ids"], items["titles"], vectors, bias)


class Retriever:
    """Scores a batch of user embeddings against every item; returns the best `max_k`."""

    def __init__(self, table: ItemTable, max_k: int) -> None:
        self.table = table
        self.max_k = min(max_k, len(table.ids))
        self._ids = np.array([s.encode() for s in table.ids], dtype=object)
        self._titles = np.array([s.encode() for s in table.titles], dtype=object)

    def __call__(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        scores = embeddings.astype(np.float32) @ self.table.vectors.T + self.table.bias
        k = self.max_k
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        return {
            wire.ITEM_IDS: self._ids[top],
            wire.ITEM_SCORES: np.take_along_axis(scores, top, axis=1),
            wire.ITEM_TITLES: self._titles[top],
        }


def check_top_k(top_k: np.ndarray, max_k: int) -> int:
    """All users of one request share one k (outputs are rectangular per request)."""
    values = np.unique(top_k.reshape(-1))
    if len(values) != 1:
        raise InputError(wire.TOP_K, f"must be the same for every user of a request, got {values}")
    k = int(values[0])
    if not 1 <= k <= max_k:
        raise InputError(wire.TOP_K, f"must be in [1, {max_k}], got {k}")
    return k
