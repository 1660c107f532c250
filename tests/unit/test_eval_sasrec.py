"""SASRec baseline and most-popular on a tiny synthetic data set (next item = item + 1)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dynemb.data.types import Dataset, Interaction, Item
from dynemb.evaluation.baselines import evaluate, most_popular
from dynemb.evaluation.sasrec import (
    SASRec,
    SASRecConfig,
    score_histories,
    score_sasrec,
    train_sasrec,
    training_windows,
)
from dynemb.evaluation.split import Split, leave_one_out

N_ITEMS = 24
# One thread: tiny ops gain nothing from two, and lose a lot when the cores are shared.
TINY = SASRecConfig(
    hidden=16, layers=1, heads=2, dropout=0.1, max_len=8, lr=5e-3, batch_size=16, num_threads=1
)


@pytest.fixture(scope="module")
def split() -> Split:
    rng = np.random.default_rng(0)
    items = {str(i): Item(str(i), f"item {i}") for i in range(N_ITEMS)}
    events = []
    for u in range(48):
        start, length = int(rng.integers(N_ITEMS)), int(rng.integers(4, 14))
        for step in range(length):
            item = str((start + step) % N_ITEMS)
            events.append(Interaction(f"u{u:02d}", item, float(step), text=item))
    return leave_one_out(Dataset("cycle", items, events, synthetic=True))


def test_training_windows_use_train_events_only(split: Split) -> None:
    inputs, targets, origins = training_windows(split, max_len=8, mode="all")
    assert inputs.shape == targets.shape and inputs.shape[1] == 8
    # Every train transition is a target exactly once; held-out items never are.
    assert int((targets != 0).sum()) == sum(max(len(s) - 1, 0) for s in split.train)
    # origins: position j of row i has read the user's training events [0, offset + j].
    for row, (user, offset) in enumerate(origins):
        for j in np.flatnonzero(inputs[row]):
            assert inputs[row, j] == split.train[user][offset + j]
            assert targets[row, j] == split.train[user][offset + j + 1]
    last_inputs, _, _ = training_windows(split, max_len=8, mode="last")
    assert len(last_inputs) == sum(len(s) >= 2 for s in split.train)


def test_loss_decreases_and_model_learns(split: Split) -> None:
    model = train_sasrec(split, TINY, seed=0)
    assert model.log is not None
    losses = [e.loss for e in model.log.epochs]
    assert len(losses) >= 5 and losses[-1] < 0.8 * losses[0]
    # The pattern is learnable: far above a random ranker's NDCG@10 (~0.2 for 24 items).
    metrics = evaluate(score_sasrec(model, split, "test"), split, "test", exclude_seen=True)
    assert metrics["ndcg@10"] > 0.5


def test_training_without_seen_items_in_the_softmax_learns(split: Split) -> None:
    model = train_sasrec(split, replace(TINY, exclude_seen=True), seed=0)
    metrics = evaluate(score_sasrec(model, split, "test"), split, "test", exclude_seen=True)
    assert metrics["ndcg@10"] > 0.5


def test_training_is_deterministic_under_a_seed(split: Split) -> None:
    config = SASRecConfig(**{**TINY.__dict__, "max_epochs": 3})
    first = train_sasrec(split, config, seed=1)
    second = train_sasrec(split, config, seed=1)
    other = train_sasrec(split, config, seed=2)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.item_emb.weight, other.item_emb.weight)
    assert np.array_equal(score_sasrec(first, split, "valid"), score_sasrec(second, split, "valid"))


def test_batched_scores_equal_single_scores() -> None:
    torch.manual_seed(0)
    model = SASRec(N_ITEMS, TINY).eval()
    histories = [np.array([3, 4, 5]), np.arange(1, 20), np.array([7])]
    batched = score_histories(model, histories)
    assert batched.shape == (3, N_ITEMS + 1) and np.all(batched[:, 0] == -np.inf)
    for row, history in enumerate(histories):
        single = score_histories(model, [history])[0]
        np.testing.assert_allclose(batched[row], single, rtol=1e-5, atol=1e-5)


def test_most_popular_counts_visible_history(split: Split) -> None:
    valid_scores = most_popular(split, "valid")
    test_scores = most_popular(split, "test")
    assert valid_scores.shape == (len(split.eval_users), split.n_items + 1)
    counts = np.bincount(np.concatenate(split.train), minlength=split.n_items + 1)
    assert valid_scores[0, 1:].tolist() == counts[1:].tolist()
    # Test-time history adds each evaluated user's validation event.
    assert test_scores[0, 1:].sum() - valid_scores[0, 1:].sum() == len(split.eval_users)


def test_baseline_report_has_both_models_and_renders_them(tmp_path) -> None:
    from dynemb.data.movielens import load_ml100k
    from dynemb.evaluation.baselines import (
        BaselineOptions,
        SASRecConfig,
        baseline_benchmark,
        render_markdown,
    )

    (tmp_path / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        + "".join(f"{i}\tMovie {i}\t1995\tDrama\n" for i in range(1, 13))
    )
    rows = [
        f"{u}\t{(u + step) % 12 + 1}\t4\t{1000 + step}\n" for u in range(1, 21) for step in range(6)
    ]
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(rows)
    )
    split = leave_one_out(load_ml100k(tmp_path))
    config = SASRecConfig(hidden=8, max_epochs=2, num_threads=1)
    report = baseline_benchmark(split, "tiny", BaselineOptions(seeds=(0, 1), config=config))
    assert [r.seed for r in report.sasrec] == [0, 1] and report.chosen == config
    assert not report.tuning
    for metrics in (report.most_popular, *(r.test for r in report.sasrec)):
        for seen in ("kept", "excluded"):
            assert 0.0 <= metrics.of(seen)["ndcg@10"] <= metrics.of(seen)["recall@10"] <= 1.0
    assert all(1 <= r.best_epoch <= 2 and r.epochs <= 2 for r in report.sasrec)
    # The report renders both models for both seen-item settings, from the same record.
    text = render_markdown(report)
    for name in ("MostPop", "SASRec"):
        for seen in ("kept", "excluded"):
            assert f"| {name} | {seen} |" in text
