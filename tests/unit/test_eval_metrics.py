"""Full-ranking metrics, hand-checked on small score matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynemb.evaluation.metrics import (
    evaluate_scores,
    exclude_seen,
    ranking_metrics,
    summarize,
    summarize_runs,
    target_ranks,
)

NEG = -np.inf  # column 0 is padding


def test_ranks_count_strictly_higher_items() -> None:
    scores = np.array(
        [
            [NEG, 0.9, 0.1, 0.5, 0.3],  # target 1 is best
            [NEG, 0.9, 0.1, 0.5, 0.3],  # target 4: below 0.9 and 0.5
            [NEG, 0.1, 0.2, 0.3, 0.4],  # target 1 is last of 4
        ]
    )
    assert target_ranks(scores, np.array([1, 4, 1])).tolist() == [1, 3, 4]


def test_ties_rank_pessimistically() -> None:
    scores = np.array([[NEG, 0.5, 0.5, 0.5, 0.1], [NEG, 1.0, 1.0, 1.0, 1.0]])
    # Two other items tie with the target: it is ranked below both; a constant model is last.
    assert target_ranks(scores, np.array([2, 3])).tolist() == [3, 4]


def test_padding_column_never_ranks() -> None:
    scores = np.array([[100.0, 0.2, 0.1]])
    assert target_ranks(scores, np.array([1])).tolist() == [1]
    with pytest.raises(ValueError):
        target_ranks(scores, np.array([0]))


def test_metrics_from_ranks_by_hand() -> None:
    m = ranking_metrics(np.array([1]), ks=(10,))
    assert m == {"recall@10": 1.0, "ndcg@10": 1.0, "mrr@10": 1.0}
    m = ranking_metrics(np.array([3]), ks=(10,))
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(4)) and m["mrr@10"] == pytest.approx(1 / 3)
    # Ranks 1, 3, 11 with K=10: the third user misses and contributes 0.
    m = ranking_metrics(np.array([1, 3, 11]), ks=(10, 20))
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["ndcg@10"] == pytest.approx((1 + 0.5) / 3)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 3)
    assert m["recall@20"] == pytest.approx(1.0)
    assert m["ndcg@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 3)


def test_exclusion_of_seen_items_keeps_the_target() -> None:
    scores = np.array([[NEG, 0.9, 0.8, 0.7, 0.1], [NEG, 0.9, 0.8, 0.7, 0.1]])
    targets = np.array([3, 2])
    histories = [np.array([1, 2]), np.array([1, 2])]  # user 2 re-consumes its target
    assert target_ranks(scores, targets).tolist() == [3, 2]
    assert target_ranks(scores, targets, histories).tolist() == [1, 1]
    masked = exclude_seen(scores, histories, targets)
    assert masked[0, 1] == NEG and masked[0, 2] == NEG and masked[1, 2] == 0.8
    assert scores[0, 1] == 0.9  # the input is not modified
    with_excl = evaluate_scores(scores, targets, histories, ks=(1,))
    assert with_excl["recall@1"] == 1.0 and with_excl["ndcg@1"] == 1.0


def test_nan_target_ranks_last() -> None:
    scores = np.array([[NEG, np.nan, 0.2, 0.1]])
    assert target_ranks(scores, np.array([1])).tolist() == [3]


def test_summarize_mean_and_sample_std() -> None:
    mean, std = summarize([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and std == pytest.approx(0.1)
    assert summarize([0.5]) == (0.5, 0.0)
    runs = summarize_runs([{"ndcg@10": 0.1}, {"ndcg@10": 0.3}])
    assert runs["ndcg@10"][0] == pytest.approx(0.2)
    assert runs["ndcg@10"][1] == pytest.approx(math.sqrt(0.02))


def test_another_item_s_nan_score_ranks_above_the_target() -> None:
    """Pessimistic, as ties are: a model that scores items NaN gains nothing by it."""
    scores = np.array([[NEG, 0.1, np.nan, np.nan, np.nan]])
    assert target_ranks(scores, np.array([1]))[0] == 4
