"""The per-item row cache: hits and misses, its bounds, LRU order, and `cached_rows`."""

from __future__ import annotations

import numpy as np
import pytest

from dynemb.serving.cache import ENTRY_OVERHEAD, RowCache, cached_rows, row_keys


def test_hits_misses_and_lru_eviction_by_entries():
    cache = RowCache(max_entries=2, max_bytes=1 << 20)
    a, b, c = np.zeros(4, np.float32), np.ones(4, np.float32), np.full(4, 2, np.float32)
    assert cache.get(b"a") is None
    cache.put(b"a", a)
    cache.put(b"b", b)
    assert cache.get(b"a") is not None  # "a" is now the most recently used
    cache.put(b"c", c)  # evicts "b", the least recently used
    assert cache.get(b"b") is None and cache.get(b"c") is not None
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (2, 2, 1, 2)
    assert stats.hit_rate == 0.5


def test_the_byte_bound_holds_and_counts_keys_rows_and_overhead():
    row = np.zeros(100, np.float32)  # 400 bytes
    per_entry = 3 + 400 + ENTRY_OVERHEAD
    cache = RowCache(max_entries=1000, max_bytes=5 * per_entry)
    for i in range(50):
        cache.put(b"%03d" % i, row)
        assert cache.stats().bytes <= 5 * per_entry
    assert len(cache) == 5 and cache.stats().evictions == 45
    cache.put(b"huge", np.zeros(10_000, np.float32))  # bigger than the whole cache
    assert cache.get(b"huge") is None and len(cache) == 5


def test_rows_are_copied_and_frozen():
    cache = RowCache(10, 1 << 20)
    row = np.arange(3, dtype=np.float32)
    cache.put(b"k", row)
    row[0] = 99.0  # the caller reuses its buffer
    kept = cache.get(b"k")
    assert kept[0] == 0.0
    with pytest.raises(ValueError):
        kept[1] = 5.0


def test_replacing_a_key_keeps_the_byte_count_right():
    cache = RowCache(10, 1 << 20)
    cache.put(b"k", np.zeros(10, np.float32))
    cache.put(b"k", np.zeros(20, np.float32))
    assert cache.stats().bytes == 1 + 80 + ENTRY_OVERHEAD and len(cache) == 1


def test_cached_rows_computes_each_distinct_missing_key_once():
    cache = RowCache(100, 1 << 20)
    values = np.arange(12, dtype=np.float32).reshape(6, 2)
    keys = row_keys(np.array([[1], [2], [1], [3], [2], [1]]))
    calls = []

    def compute(rows: np.ndarray) -> np.ndarray:
        calls.append(rows.tolist())
        return values[rows]

    out = cached_rows(keys, compute, cache)
    assert calls == [[0, 1, 3]]  # first occurrences of keys 1, 2, 3
    np.testing.assert_array_equal(out, values[[0, 1, 0, 3, 1, 0]])
    again = cached_rows(keys, compute, cache)
    assert len(calls) == 1  # everything from the cache
    np.testing.assert_array_equal(again, out)
    uncached = cached_rows(keys, compute, None)
    np.testing.assert_array_equal(uncached, out)


def test_row_keys_tell_rows_and_arrays_apart():
    ids = np.array([[1, 2], [1, 2], [2, 1]], np.int64)
    counts = np.array([2, 1, 2], np.int64)
    keys = row_keys(ids, counts)
    assert keys[0] != keys[1] and keys[0] != keys[2] and len(set(keys)) == 3
    digests = row_keys(np.zeros((2, 3, 32, 32), np.uint8), digest=True)
    assert digests[0] == digests[1] and len(digests[0]) == 16
