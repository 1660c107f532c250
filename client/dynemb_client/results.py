"""Decode the ensembles' outputs into plain Python/numpy values (shared by sync and async)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

from dynemb_client.contract import (
    ITEM_IDS,
    ITEM_SCORES,
    ITEM_TITLES,
    USER_EMBEDDING,
    version_output,
)
from dynemb_client.errors import ServerError
from dynemb_client.requests import InferCall

__all__ = ["Recommendation", "Versioned", "parse_embeddings", "parse_recommendations"]

T = TypeVar("T")


class _Result(Protocol):
    def as_numpy(self, name: str) -> np.ndarray | None: ...


@dataclass(frozen=True)
class Recommendation:
    """One recommended item, best first in the list the client returns."""

    item_id: str
    score: float
    title: str


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """An answer and, per stage, the version that computed it: during a rolling swap two
    versions of a stage serve at once, and this says which one answered."""

    value: T
    versions: Mapping[str, int]  # stage name -> version number


def parse_versions(
    result: _Result, model: str, batch: int, stages: Sequence[str]
) -> dict[str, int]:
    """Stage -> version for one answer. The users of one request run through each stage
    together (Triton never splits a request), so they always agree; a server where they
    did not would be mixing versions, and that is an error, not an answer."""
    versions = {}
    for stage in stages:
        column = _output(result, version_output(stage), model, batch).reshape(-1)
        if len(set(column.tolist())) != 1:
            found = sorted(set(column.tolist()))
            raise ServerError(f"{stage}: one answer from versions {found}", model=model)
        versions[stage] = int(column[0])
    return versions


def with_versions(result: _Result, call: InferCall, value: T) -> Versioned[T]:
    """`value` parsed from `result`, with the versions `call` asked for."""
    return Versioned(value, parse_versions(result, call.model, call.batch, call.stages))


def _output(result: _Result, name: str, model: str, batch: int) -> np.ndarray:
    array = result.as_numpy(name)
    if array is None or array.ndim < 1 or array.shape[0] != batch:
        shape = None if array is None else array.shape
        raise ServerError(f"output {name} missing or not batch {batch} (got {shape})", model=model)
    return array


def parse_embeddings(result: _Result, model: str, batch: int) -> np.ndarray:
    """USER_EMBEDDING as float32 (batch, D)."""
    embeddings = _output(result, USER_EMBEDDING, model, batch)
    return np.asarray(embeddings, dtype=np.float32).reshape(batch, -1)


def parse_recommendations(
    result: _Result,
    model: str,
    batch: int,
    k: int,
    exclude: Sequence[AbstractSet[str]] = (),
) -> list[list[Recommendation]]:
    """Up to k items per user; empty item ids are padding and are skipped, and so are the
    ids in `exclude[user]` (when given, one set per user)."""
    ids = _output(result, ITEM_IDS, model, batch).reshape(batch, -1)
    scores = _output(result, ITEM_SCORES, model, batch).reshape(batch, -1)
    titles = _output(result, ITEM_TITLES, model, batch).reshape(batch, -1)
    users = []
    for row in range(batch):
        skip = exclude[row] if exclude else frozenset()
        items = []
        for item, score, title in zip(ids[row], scores[row], titles[row], strict=True):
            item_id = _text(item)
            if item_id and item_id not in skip:
                items.append(
                    Recommendation(item_id=item_id, score=float(score), title=_text(title))
                )
        users.append(items[:k])
    return users


def _text(value: object) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)
