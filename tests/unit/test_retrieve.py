"""retrieve: E_t · v + b over the item table, top-K in score order, table round trip."""

from __future__ import annotations

import numpy as np
import pytest

from dynemb.errors import InputError
from dynemb.stages.retrieve import ItemTable, Retriever, check_top_k
from dynemb_client import contract as wire


def table(bias=None) -> ItemTable:
    vectors = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32)
    return ItemTable(["a", "b", "c"], ["A", "B", "C"], vectors, bias)


def test_scores_are_dot_plus_bias_in_order():
    user = np.array([[1.0, 0.0]], np.float32)
    out = Retriever(table(), max_k=3)(user)
    assert out[wire.ITEM_IDS][0].tolist() == [b"a", b"b", b"c"]
    np.testing.assert_allclose(out[wire.ITEM_SCORES][0], [1.0, 0.8, 0.0])
    # A bias is what lets a popular item outrank a closer one.
    biased = Retriever(table(np.array([0.0, 0.0, 1.5], np.float32)), max_k=2)(user)
    assert biased[wire.ITEM_IDS][0].tolist() == [b"c", b"a"]
    np.testing.assert_allclose(biased[wire.ITEM_SCORES][0], [1.5, 1.0])


def test_table_round_trip_and_tables_without_bias(tmp_path):
    original = table(np.array([0.1, 0.2, 0.3], np.float32))
    original.save(tmp_path)
    loaded = ItemTable.load(tmp_path)
    np.testing.assert_array_equal(loaded.bias, original.bias)
    (tmp_path / "item_bias.npy").unlink()  # a table written before biases existed
    np.testing.assert_array_equal(ItemTable.load(tmp_path).bias, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="biases"):
        table(np.zeros(2, np.float32))


def test_top_k_is_checked():
    assert check_top_k(np.array([3, 3]), max_k=10) == 3
    for bad in (np.array([0]), np.array([11]), np.array([2, 3])):
        with pytest.raises(InputError):
            check_top_k(bad, max_k=10)


def test_a_catalogue_smaller_than_k_answers_all_its_items(repo):
    """k is checked against the contract's limit (what a client can know), not the
    catalogue's size: 3 items and k = 10 (or k + the items a client excludes) is every
    item, not bad input."""
    from dynemb.manifest import Manifest
    from dynemb.stages import get
    from dynemb.stages.retrieve import RetrieveRunner

    manifest = Manifest.load(repo / "retrieve" / "1")
    runner = RetrieveRunner(get("retrieve").spec(manifest.dims), manifest, table())
    users = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    for k in (2, 10, manifest.dims.max_top_k):
        inputs = {wire.USER_EMBEDDING: users, wire.TOP_K: np.full((2, 1), k, np.int32)}
        runner.check(inputs)
        out = runner.trim(inputs, runner(inputs))
        assert out[wire.ITEM_IDS].shape == (2, min(k, 3))
    with pytest.raises(InputError, match="TOP_K"):
        over = np.full((2, 1), manifest.dims.max_top_k + 1, np.int32)
        runner.check({wire.USER_EMBEDDING: users, wire.TOP_K: over})
