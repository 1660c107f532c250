"""Full-ranking metrics: every item is a candidate, no sampled negatives.

Scores are a (n_users, n_items + 1) matrix whose column 0 is padding and never ranks.
Ties are broken pessimistically: every other item scored equal to the target counts as
ranked above it, so rank = 1 + #(score > s_t) + #(score == s_t, other items). Counting only
strictly higher scores (1 + #(score > s_t)) would let a constant or collapsed model rank
every target first; with the pessimistic rule it ranks every target last. Continuous model
scores rarely tie, so the two rules differ mainly for count-based baselines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (10, 20)


def exclude_seen(
    scores: np.ndarray, histories: Sequence[np.ndarray], targets: np.ndarray
) -> np.ndarray:
    """Copy of `scores` with each user's already-seen items at -inf, except the target.

    The target is kept so that a user who re-consumes an item is still scored on it.
    """
    out = np.array(scores, dtype=np.float64, copy=True)
    if len(histories) != out.shape[0]:
        raise ValueError(f"{len(histories)} histories for {out.shape[0]} score rows")
    for row, seen in enumerate(histories):
        out[row, seen] = -np.inf
    rows = np.arange(out.shape[0])
    out[rows, targets] = np.asarray(scores, dtype=np.float64)[rows, targets]
    return out


def target_ranks(
    scores: np.ndarray,
    targets: np.ndarray,
    histories: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """1-based rank of each target among items 1..n_items (pessimistic ties, see module doc).

    With `histories`, already-seen items are excluded first (`exclude_seen`). A NaN target
    score ranks last; another item's NaN score ranks above the target.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(f"scores {scores.shape} do not match {targets.shape[0]} targets")
    if np.any(targets < 1) or np.any(targets >= scores.shape[1]):
        raise ValueError("targets must be item indices in 1..n_items")
    if histories is not None:
        scores = exclude_seen(scores, histories, targets)
    items = scores[:, 1:]  # drop the padding column
    target_scores = scores[np.arange(len(targets)), targets][:, None]
    n_items = items.shape[1]
    # An item the model scored NaN ranks above the target (pessimistic, as ties are).
    higher = ((items > target_scores) | np.isnan(items)).sum(axis=1)
    tied_others = (items == target_scores).sum(axis=1) - 1
    ranks = 1 + higher + tied_others
    return np.where(np.isnan(target_scores[:, 0]), n_items, ranks).astype(np.int64)


def ranking_metrics(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K, NDCG@K and MRR@K averaged over users (one relevant item per user).

    With a single target, Recall@K is the hit rate, NDCG@K = 1/log2(rank + 1) when the
    target is in the top K, and MRR@K = 1/rank when it is.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks to average")
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks <= k
        out[f"recall@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / ranks, 0.0).mean())
    return out


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k (one relevant item): what `ranking_metrics` averages."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def ratio_interval(
    a: np.ndarray, b: np.ndarray, level: float = 0.95, n_boot: int = 4000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) / mean(b) for per-user values of two models
    over the same users: `a` (seeds_a, users), `b` (seeds_b, users). Each replicate draws
    each model's seeds with replacement and one sample of users for both (paired), so the
    interval holds both the seed-to-seed and the user-sampling uncertainty."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or 0 in a.shape + b.shape:
        raise ValueError(f"need (seeds, users) arrays of the same users: {a.shape}, {b.shape}")
    rng = np.random.default_rng(seed)
    users = a.shape[1]
    ratios = np.empty(n_boot)
    for i in range(n_boot):
        rows = rng.integers(0, users, users)
        mean_a = a[rng.integers(0, len(a), len(a))].mean(0)[rows].mean()
        mean_b = b[rng.integers(0, len(b), len(b))].mean(0)[rows].mean()
        ratios[i] = mean_a / mean_b if mean_b > 0 else np.nan
    low, high = np.nanpercentile(ratios, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def evaluate_scores(
    scores: np.ndarray,
    targets: np.ndarray,
    histories: Sequence[np.ndarray] | None = None,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Ranks then metrics in one call; pass `histories` to exclude seen items."""
    return ranking_metrics(target_ranks(scores, targets, histories), ks)


def summarize(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) across seeds."""
    if len(values) == 0:
        raise ValueError("no values to summarize")
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return float(arr.mean()), std


def summarize_runs(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """`summarize` per metric name over several runs (e.g. one dict per seed)."""
    if not runs:
        raise ValueError("no runs to summarize")
    names = list(runs[0])
    return {name: summarize([run[name] for run in runs]) for name in names}


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """'0.1234 ± 0.0012' (NaN-safe) for result tables."""
    if math.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
