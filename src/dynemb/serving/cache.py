"""Per-item caches inside the stages: the same content gives the same features.

What a stage computes per event (a text's vector, an image's, a label set's; a text's
tokens, an image's pixels) depends only on that content and the stage's weights, so it is
the same for every user who had the item. A `RowCache` maps a content key to that row,
least recently used first out, bounded in entries and in bytes. It belongs to one loaded
runner, i.e. to one stage version in one process: a swapped version starts empty, so a
swap can never serve features computed by the version before it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses
        return self.hits / looked_up if looked_up else 0.0


# Python's own bookkeeping per entry (the key's bytes object, the row's array object, the
# dict slot), counted with the key and row so that `max_bytes` bounds real memory.
ENTRY_OVERHEAD = 256


class RowCache:
    """An LRU map from a content key (bytes) to one row (a numpy array), bounded by
    `max_entries` and by `max_bytes` (key, row and per-entry overhead). Thread-safe."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("a cache needs room for at least one entry and one byte")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._rows: OrderedDict[bytes, Any] = OrderedDict()
        self._sizes: dict[bytes, int] = {}
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0
        self._lock = threading.Lock()

    def get(self, key: bytes) -> Any:
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                self._misses += 1
                return None
            self._rows.move_to_end(key)
            self._hits += 1
            return row

    def put(self, key: bytes, row: Any, nbytes: int | None = None) -> None:
        """Remember `row` (a numpy array, copied and frozen; or any value whose size the
        caller gives as `nbytes`)."""
        if isinstance(row, np.ndarray):
            row = np.array(row, copy=True)  # owned: the caller's batch buffer is reused
            row.setflags(write=False)
            nbytes = row.nbytes
        elif nbytes is None:
            raise ValueError("give the size of a value that is not a numpy array")
        size = len(key) + nbytes + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return  # larger than the whole cache: never kept
        with self._lock:
            old = self._sizes.pop(key, None)
            if old is not None:
                del self._rows[key]
                self._bytes -= old
            self._rows[key] = row
            self._sizes[key] = size
            self._bytes += size
            while len(self._rows) > self.max_entries or self._bytes > self.max_bytes:
                evicted_key, _ = self._rows.popitem(last=False)
                self._bytes -= self._sizes.pop(evicted_key)
                self._evictions += 1

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, len(self._rows), self._bytes
            )

    def __len__(self) -> int:
        return len(self._rows)


def row_keys(*arrays: np.ndarray, digest: bool = False) -> list[bytes]:
    """One key per row of the arrays (same leading length): their bytes side by side, or
    with `digest` a 16-byte BLAKE2b of them (for large rows such as images)."""
    n = len(arrays[0])
    parts = [np.ascontiguousarray(a).reshape(n, -1).view(np.uint8) for a in arrays]
    joined = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if digest:
        return [hashlib.blake2b(row.data, digest_size=16).digest() for row in joined]
    return [row.tobytes() for row in joined]


def cached_rows(
    keys: Sequence[bytes],
    compute: Callable[[np.ndarray], np.ndarray],
    cache: RowCache | None,
) -> np.ndarray:
    """The rows for `keys`, in order: each distinct key looked up once, the ones not
    cached computed together (`compute(indices)` gets the index of each one's first
    occurrence and returns their rows, in that order) and remembered."""
    first: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    found: dict[bytes, np.ndarray] = {}
    missing: list[bytes] = []
    for key in first:
        row = cache.get(key) if cache is not None else None
        if row is None:
            missing.append(key)
        else:
            found[key] = row
    if missing:
        rows = compute(np.array([first[key] for key in missing], dtype=np.int64))
        for key, row in zip(missing, rows, strict=True):
            found[key] = row
            if cache is not None:
                cache.put(key, row)
    return np.stack([found[key] for key in keys])
