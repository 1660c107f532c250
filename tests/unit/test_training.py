"""Training: examples as served, table-gather parity, learning, determinism, evaluation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dynemb.checkpoint import Checkpoint, StaleCheckpointError
from dynemb.data.sent import event_labels, labels_cut
from dynemb.data.synthetic import SyntheticConfig, generate
from dynemb.data.types import Interaction
from dynemb.dims import DIMS
from dynemb.errors import UsageError
from dynemb.evaluation.quality import evaluate
from dynemb.evaluation.split import leave_one_out
from dynemb.manifest import Provenance
from dynemb.stages.retrieve.table import build_item_table
from dynemb.training.examples import (
    ExampleBuilder,
    collate,
    collate_windows,
    item_label,
    seen_items,
)
from dynemb.training.model import TrainModel, Variant, build_joint
from dynemb.training.train import TrainOptions, fit, item_table, make_optimizer
from dynemb_client import contract as wire

TINY = TrainOptions(
    max_minutes=1.0,
    max_epochs=1,
    batch_size=8,
    llm_layers=1,
    progress=False,
)


@pytest.fixture(scope="module")
def data():
    config = SyntheticConfig(n_users=6, items_per_category=3, events_per_user=(8, 12))
    return generate(replace(config, n_categories=3)).dataset


@pytest.fixture(scope="module")
def builder(data):
    return ExampleBuilder(data, leave_one_out(data), DIMS, item_labels=True)


def test_example_is_the_prefix_before_the_target_at_its_time(builder):
    events = builder.split.events[0]
    cut = 5
    raw = builder.raw_inputs(events[:cut], events[cut].time)
    assert raw[wire.QUERY_TIME][0] == events[cut].time
    assert int(raw[wire.EVENT_COUNT][0]) == cut
    np.testing.assert_array_equal(raw[wire.EVENT_TIME][:cut], [e.time for e in events[:cut]])
    assert raw[wire.EVENT_LABELS][0][0] == item_label(events[0].item_id).encode()
    example = builder.example(0, cut)
    assert example.count == cut and example.event_mask.sum() == cut
    assert example.target == builder.split.item_index[events[cut].item_id]
    # The target's own text is never an event of its example (beyond true repeats).
    seen = {builder.tables.text_index[e.text] for e in events[:cut]}
    assert set(example.text[:cut].tolist()) == seen
    assert not example.text[cut:].any()


@pytest.mark.parametrize("item_labels", [False, True])
@pytest.mark.parametrize("own", [0, 1, 2, 3])
def test_labels_are_cut_to_m_after_the_item_label_and_the_cut_is_told(item_labels, own):
    event = Interaction("u", "i7", 1.0, "t", labels=tuple(f"genre:g{k}" for k in range(own)))
    sent = event_labels(event, 2, item_labels)
    assert sent == (((item_label("i7"),) if item_labels else ()) + event.labels)[:2]
    assert labels_cut(event, 2, item_labels) == (not set(event.labels) <= set(sent))


def test_stale_query_time_hides_newer_events(builder):
    events = builder.split.events[0]
    stale = builder.example(0, 6, query_time=events[3].time - 1.0)
    assert stale.count == 3


def test_train_cuts_never_target_held_out_events(builder):
    for user in builder.split.eval_users:
        n = len(builder.split.events[user])
        assert max(builder.train_cuts(int(user))) == n - 3
        assert builder.eval_cut(int(user), "valid") == n - 2


def test_table_gather_equals_the_served_computation(data, builder):
    joint = build_joint(DIMS, len(builder.labels), builder.split.n_items, llm_layers=1, seed=0)
    torch.nn.init.normal_(joint.item_tower.bias.weight)  # zero at init: make it count
    model = TrainModel(joint, builder.tables, builder.items).eval()
    pre = builder.preprocessor
    keys = [(0, 4), (1, 7), (2, 2)]
    full = [
        pre.user(builder.raw_inputs(builder.split.events[u][:c], builder.split.events[u][c].time))
        for u, c in keys
    ]
    x = {k: torch.from_numpy(np.stack([f[k] for f in full])) for k in full[0]}
    with torch.no_grad():
        expected = joint.user_embedding(x)
        text, image = model.text_table(), model.image_table()
        got = model.user_embedding(collate([builder.example(*k) for k in keys]), text, image)
        items, bias = model.items(text, image)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    ids = builder.split.item_ids[1:]
    checkpoint = Checkpoint(joint, builder.labels, ids, Provenance(), trained=True)
    table = build_item_table(checkpoint, data)
    assert table.ids == ids
    np.testing.assert_allclose(table.vectors, items.numpy(), atol=1e-5)
    np.testing.assert_allclose(table.bias, bias.numpy(), atol=1e-6)


def test_windows_target_training_events_only_and_each_once_in_all_mode():
    config = SyntheticConfig(n_users=3, items_per_category=4, events_per_user=(130, 140))
    data = generate(replace(config, n_categories=3)).dataset
    b = ExampleBuilder(data, leave_one_out(data), DIMS, item_labels=True)
    for user in range(3):
        train = b.split.train[user]
        windows = b.windows(user, "all")
        assert len(windows) > 2  # long histories are cut into several windows
        targets = np.concatenate([w.targets[w.targets > 0] for w in windows])
        assert sorted(targets.tolist()) == sorted(train.tolist())
        assert all(w.count <= DIMS.max_events for w in windows)
        (last,) = b.windows(user, "last")
        assert last.count == DIMS.max_events and last.targets[0] == 0
        np.testing.assert_array_equal(last.targets[1:], train[-DIMS.max_events :])
        # The training softmax leaves out exactly the items of every earlier training event,
        # also those before the window (row k of a window: before its output k's target).
        seen = seen_items(windows, b.split.n_items)
        for i, w in enumerate(windows):
            for k in range(w.count + 1):
                before = set(train[: w.start + k].tolist())
                assert set((np.flatnonzero(seen[i, k]) + 1).tolist()) == before
            assert not seen[i, w.count + 1 :].any()  # rows past this window's outputs


def test_every_window_output_is_the_served_answer_for_its_prefix(builder):
    """Training scores each prefix of a window in one causal pass; output k must equal what
    the served computation (Preprocessor -> JointModel) returns for the first k events of
    the window, asked at the time of event k+1. Training-only dropout is off in eval mode."""
    joint = build_joint(DIMS, len(builder.labels), builder.split.n_items, llm_layers=1, seed=0)
    model = TrainModel(joint, builder.tables, builder.items, dropout=0.5).eval()
    pre = builder.preprocessor
    users = [0, 1, 2]
    windows = [builder.windows(u)[0] for u in users]
    with torch.no_grad():
        text, image = model.text_table(), model.image_table()
        got = model.window_embeddings(collate_windows(windows), text, image)
        for row, (user, window) in enumerate(zip(users, windows, strict=True)):
            events = builder.split.events[user][: window.count + 1]
            requests = [
                pre.user(builder.raw_inputs(events[:k], events[k].time))
                for k in range(window.count + 1)
            ]
            x = {k: torch.from_numpy(np.stack([r[k] for r in requests])) for k in requests[0]}
            expected = joint.user_embedding(x)
            torch.testing.assert_close(got[row, : window.count + 1], expected, atol=1e-5, rtol=1e-4)
            targets = [builder.split.item_index[e.item_id] for e in events]
            assert window.targets.tolist() == targets


def test_loss_decreases_in_a_few_steps(builder):
    torch.manual_seed(0)
    joint = build_joint(DIMS, len(builder.labels), builder.split.n_items, llm_layers=1, seed=0)
    model = TrainModel(joint, builder.tables, builder.items)
    model.freeze()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = collate([builder.example(u, 3) for u in range(6)])
    target = torch.from_numpy(batch.target) - 1
    losses = []
    model.train()
    for _ in range(6):
        text, image = model.text_table(), model.image_table()
        logits = model.logits(model.user_embedding(batch, text, image), *model.items(text, image))
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("llm_trainable", [False, True])
def test_lookup_tables_get_their_own_learning_rate(builder, llm_trainable):
    joint = build_joint(DIMS, len(builder.labels), builder.split.n_items, llm_layers=1, seed=0)
    model = TrainModel(joint, builder.tables, builder.items)
    model.freeze(llm_trainable)
    options = replace(TINY, lr=1e-3, embedding_lr=1e-2, llm_lr=1e-4, llm_trainable=llm_trainable)
    groups = make_optimizer(model, options).param_groups
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Every trainable weight is in exactly one group, nothing frozen is optimised.
    assert sum(len(g["params"]) for g in groups) == len(by_id) == len(trainable)
    stages = model.stages
    assert by_id[id(stages["label_mlp"].bag.weight)] == 1e-2
    assert by_id[id(model.joint.item_tower.ids.weight)] == 1e-2
    assert by_id[id(model.joint.item_tower.bias.weight)] == 1e-2
    assert by_id[id(stages["temporal_lstm"].inp.weight)] == 1e-3
    assert id(stages["text_rnn"].embed.weight) not in by_id  # pretrained, frozen
    bert_words = stages["llm_encoder"].bert.embeddings.word_embeddings.weight
    assert by_id.get(id(bert_words)) == (1e-4 if llm_trainable else None)
    without = make_optimizer(model, replace(options, embedding_lr=None)).param_groups
    assert {g["lr"] for g in without} == ({1e-3, 1e-4} if llm_trainable else {1e-3})


def test_training_is_deterministic_and_evaluates(data, builder, tmp_path):
    split = builder.split
    a = fit(data, split, TINY, builder=builder)
    b = fit(data, split, TINY, builder=builder)
    assert a.epochs[0].loss == b.epochs[0].loss
    np.testing.assert_array_equal(item_table(a.model)[0], item_table(b.model)[0])
    metrics = evaluate(a)
    for values in (metrics.kept, metrics.excluded):
        assert 0.0 <= values["ndcg@10"] <= values["recall@10"] <= values["recall@20"] <= 1.0
    # The saved checkpoint round-trips through Checkpoint.load (what `dynemb build` reads).
    path = tmp_path / "c.pt"
    a.checkpoint(data).save(path)
    loaded = Checkpoint.load(path)
    assert loaded.trained and loaded.labels == builder.labels
    assert loaded.model.stages["llm_encoder"].bert.config.num_hidden_layers == 1
    # A checkpoint of an older format is refused by name, not half-loaded.
    raw = torch.load(path, weights_only=True)
    raw["format"] = 1
    torch.save(raw, path)
    with pytest.raises(StaleCheckpointError, match="retrain"):
        Checkpoint.load(path)


def test_checkpoint_loads_with_its_own_dims_and_refuses_others(data, builder, tmp_path):
    from dynemb.checkpoint import CheckpointError

    wide = replace(DIMS, max_events=12, text_dim=16)
    trained = fit(data, builder.split, replace(TINY, max_epochs=1), dims=wide)
    path = tmp_path / "wide.pt"
    trained.checkpoint(data).save(path)
    loaded = Checkpoint.load(path)
    assert loaded.dims == wide  # not the global DIMS
    assert loaded.model.stages["text_rnn"].gru.hidden_size == 16
    with pytest.raises(CheckpointError, match="max_events: 12 != 50"):
        Checkpoint.load(path, dims=DIMS)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        Checkpoint.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        Checkpoint.load(tmp_path / "junk.pt")


def test_ablation_variant_without_ids_trains(data, builder):
    options = replace(TINY, variant=Variant(item_ids=False, encoder="mean"))
    trained = fit(data, builder.split, options, builder=builder)
    assert trained.model.joint.item_tower.ids is None
    assert not trained.builder.item_labels


@pytest.mark.parametrize(
    ("keep", "said"), [(3, "nothing to train on"), (2, "nothing to validate on")]
)
def test_too_few_events_a_user_is_said_before_training(data, keep, said):
    """Every user's first `keep` events only: 3 leaves each one training event (no cut to
    learn from), 2 leaves no user to validate on. Training divided by zero on the first."""
    kept = [e for events in data.by_user().values() for e in events[:keep]]
    few = replace(data, interactions=kept)
    with pytest.raises(UsageError, match=said):
        fit(few, leave_one_out(few), TINY)
