"""The quality benchmark's parts: cold items withheld from training, the ratio's bootstrap
interval, the content-only loss, title embeddings, and one small run end to end."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from dynemb.data.synthetic import SyntheticConfig, generate
from dynemb.evaluation.metrics import ndcg_per_user, ranking_metrics, ratio_interval
from dynemb.evaluation.quality import (
    QualityOptions,
    cold_item_users,
    cold_items,
    quality_benchmark,
)
from dynemb.evaluation.results import SeenMetrics
from dynemb.evaluation.split import leave_one_out
from dynemb.stages.llm_encoder.sentences import SENTENCE_DIM, sentence_embeddings
from dynemb.training.train import TrainOptions, fit, item_table

TINY = TrainOptions(max_minutes=1.0, max_epochs=1, batch_size=8, llm_layers=1, progress=False)


@pytest.fixture(scope="module")
def data():
    config = SyntheticConfig(n_users=12, items_per_category=4, events_per_user=(8, 12))
    return generate(replace(config, n_categories=3)).dataset


def test_withhold_removes_every_training_event_of_the_items_and_keeps_the_targets(data):
    split = leave_one_out(data)
    items = cold_items(split)
    assert len(items) == round(0.1 * split.n_items) and np.all(items >= 1)
    np.testing.assert_array_equal(items, cold_items(leave_one_out(data)))  # fixed
    cold = split.withhold(items)
    np.testing.assert_array_equal(cold.withheld, items)
    np.testing.assert_array_equal(cold.valid, split.valid)
    np.testing.assert_array_equal(cold.test, split.test)
    for user in range(split.n_users):
        assert not np.isin(cold.train[user], items).any()
        kept = split.train[user][~np.isin(split.train[user], items)]
        np.testing.assert_array_equal(cold.train[user], kept)
        n = len(cold.train[user])
        assert [cold.item_index[e.item_id] for e in cold.events[user][:n]] == kept.tolist()
        assert cold.events[user][n:] == split.events[user][len(split.train[user]) :]
    users = cold_item_users(cold)
    assert np.isin(cold.test[users], items).all()


def test_withheld_items_get_no_id_rows_and_stay_out_of_the_softmax(data):
    split = leave_one_out(data)
    cold = split.withhold(np.array([1, 2, 3]))
    trained = fit(data, cold, replace(TINY, content_loss=0.5))
    tower = trained.model.joint.item_tower
    for table in (tower.ids.weight, tower.bias.weight):
        assert torch.count_nonzero(table[[0, 1, 2, 3]]) == 0  # row 0 and the withheld items
        assert torch.count_nonzero(table[4:]) > 0  # the others learned
    # A withheld item is scored exactly as the content-only table scores it.
    vectors, bias = item_table(trained.model)
    content_vectors, content_bias = item_table(trained.model, with_ids=False)
    np.testing.assert_allclose(vectors[:3], content_vectors[:3], atol=1e-6)
    np.testing.assert_allclose(bias[:3], content_bias[:3], atol=1e-6)


def test_content_loss_changes_training_and_the_content_only_table(data):
    split = leave_one_out(data)
    plain = fit(data, split, replace(TINY, content_loss=0.0))
    both = fit(data, split, replace(TINY, content_loss=1.0))
    assert plain.epochs[0].loss != both.epochs[0].loss
    assert not np.allclose(item_table(plain.model, False)[0], item_table(both.model, False)[0])


def test_title_embeddings_are_the_pretrained_sentence_model():
    titles = ["Star Wars (1977)", "Return of the Jedi (1983)", "Toy Story (1995)", ""]
    e = sentence_embeddings(titles)
    assert e.shape == (4, SENTENCE_DIM) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e[:3], axis=1), 1.0, rtol=1e-5)
    assert not e[3].any()  # no title, no vector
    similarity = e @ e.T
    assert similarity[0, 1] > similarity[0, 2] + 0.1  # two Star Wars films are nearer
    np.testing.assert_allclose(sentence_embeddings(titles[:1]), e[:1], atol=1e-5)  # batch-free


def test_per_user_ndcg_averages_to_the_metric():
    ranks = np.array([1, 3, 11, 2, 50])
    assert ndcg_per_user(ranks).mean() == pytest.approx(ranking_metrics(ranks)["ndcg@10"])
    scores = np.array([[-np.inf, 0.9, 0.1, 0.5], [-np.inf, 0.2, 0.8, 0.1]])
    metrics = SeenMetrics.from_scores(
        scores, np.array([3, 2]), [np.array([1]), np.array([], np.int64)]
    )
    assert metrics.ndcg10_per_user == pytest.approx([1.0, 1.0])  # item 1 seen: 3 ranks first
    assert metrics.kept["ndcg@10"] < metrics.excluded["ndcg@10"]


def test_ratio_interval_holds_the_ratio_and_narrows_with_more_users():
    rng = np.random.default_rng(0)

    def interval(users):
        a, b = rng.uniform(0, 0.72, (5, users)), rng.uniform(0, 0.6, (3, users))  # 1.2x
        low, high = ratio_interval(a, b)
        assert low < a.mean() / b.mean() < high
        return low, high

    low, high = interval(300)
    assert low < 1.2 < high
    narrow_low, narrow_high = interval(3000)
    assert narrow_high - narrow_low < (high - low) / 2
    with pytest.raises(ValueError):
        ratio_interval(np.ones((2, 3)), np.ones((2, 4)))


def test_quality_benchmark_end_to_end_in_two_worker_processes(data, tmp_path):
    options = QualityOptions(
        data="synthetic",
        seeds=(0, 1),
        train=TINY,
        ablations=False,
        workers=2,
        out_dir=tmp_path,
        stem="q",
        runs_dir=tmp_path / "runs",
    )
    result = quality_benchmark(data, options)
    assert [r.seed for r in result.models["dynemb"].runs] == [0, 1]
    assert [r.seed for r in result.models["SASRec-CE"].runs] == [0, 1]
    low, high = result.ratio_interval
    assert low <= high
    cold = result.cold_items
    assert cold is not None and cold.items == round(0.1 * result.items)
    assert cold.users == len(cold.dynemb[0].test.ndcg10_per_user)
    assert len(cold.dynemb_all_users[0].ndcg10_per_user) == result.evaluated_users
    text = (tmp_path / "q.md").read_text(encoding="utf-8")
    assert "## Cold items" in text and "95% interval" in text and "Content-only" in text
    # The same two runs in this process give the same numbers (workers change nothing).
    again = quality_benchmark(data, replace(options, workers=1, cold_items=False, resume=False))
    assert [r.test for r in again.models["dynemb"].runs] == [
        r.test for r in result.models["dynemb"].runs
    ]


def test_seen_items_are_the_events_sent_or_the_whole_history_as_asked(data, monkeypatch):
    """A user with only the newest k events has seen only those k items: the short-history
    slice (seen="sent") leaves the rest of the history rankable. A session past the
    window (one limit per user, the sessions-quality benchmark) has still had its whole
    history, and its ranking leaves it all out."""
    from dynemb.evaluation import quality

    split = leave_one_out(data)
    trained = fit(data, split, TINY)
    excluded: list[int] = []
    real = SeenMetrics.from_scores

    def recording(scores, targets, histories):
        excluded.extend(len(h) for h in histories)
        return real(scores, targets, histories)

    monkeypatch.setattr(quality.SeenMetrics, "from_scores", staticmethod(recording))
    quality.evaluate(trained, limit=3, seen="sent")
    assert excluded and max(excluded) == 3
    excluded.clear()
    quality.evaluate(trained)
    whole = list(excluded)
    assert max(whole) > 3
    per_user = [i % 4 for i in range(len(whole))]  # 0 sends no event: none seen
    excluded.clear()
    quality.evaluate(trained, limit=per_user, seen="sent")
    assert excluded == [min(k, n) for k, n in zip(per_user, whole, strict=True)]
    excluded.clear()
    quality.evaluate(trained, limit=per_user)
    assert excluded == whole
    with pytest.raises(ValueError, match="seen"):
        quality.evaluate(trained, seen="window")
