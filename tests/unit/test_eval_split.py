"""Leave-one-out split: targets are each user's newest events, nothing held out is trained on."""

from __future__ import annotations

import numpy as np
import pytest

from dynemb.data.types import Dataset, Interaction, Item
from dynemb.evaluation.split import PAD, leave_one_out


def _dataset(rows: list[tuple[str, str, float]]) -> Dataset:
    """Rows in source order; sorted by (user, time) with a stable sort, as loaders do."""
    events = [Interaction(u, i, t, text=f"{u}-{i}") for u, i, t in rows]
    events.sort(key=lambda e: (e.user_id, e.time))
    items = {i: Item(i, f"title {i}") for i in ("a", "b", "c", "d", "e")}
    return Dataset("toy", items, events)


ROWS = [
    ("u1", "a", 10.0),
    ("u1", "b", 20.0),
    ("u1", "c", 30.0),
    ("u1", "d", 40.0),
    ("u2", "e", 5.0),
    ("u2", "a", 6.0),  # u2 has 2 events: below min_events=3, all training
    ("u3", "b", 1.0),
    ("u3", "d", 7.0),  # tie at t=7: file order decides, so "c" is the last event
    ("u3", "c", 7.0),
]


def test_targets_are_last_and_second_last_events() -> None:
    split = leave_one_out(_dataset(ROWS))
    idx = split.item_index
    assert split.users == ["u1", "u2", "u3"]
    assert split.train[0].tolist() == [idx["a"], idx["b"]]
    assert split.valid[0] == idx["c"] and split.test[0] == idx["d"]


def test_ties_keep_file_order() -> None:
    split = leave_one_out(_dataset(ROWS))
    idx = split.item_index
    assert split.valid[2] == idx["d"] and split.test[2] == idx["c"]
    assert split.target_event(2, "test").item_id == "c"


def test_short_users_go_entirely_to_training() -> None:
    split = leave_one_out(_dataset(ROWS))
    assert split.train[1].tolist() == [split.item_index["e"], split.item_index["a"]]
    assert split.valid[1] == PAD and split.test[1] == PAD
    assert split.eval_users.tolist() == [0, 2]
    strict = leave_one_out(_dataset(ROWS), min_events=4)
    assert strict.eval_users.tolist() == [0]
    assert len(strict.train[2]) == 3
    with pytest.raises(ValueError):
        leave_one_out(_dataset(ROWS), min_events=2)


def test_item_index_reserves_zero_for_padding() -> None:
    split = leave_one_out(_dataset(ROWS))
    assert sorted(split.item_index.values()) == list(range(1, split.n_items + 1))
    assert split.item_ids[0] == ""
    assert all(split.item_ids[i] == item for item, i in split.item_index.items())


def test_no_held_out_event_leaks_into_training() -> None:
    rng = np.random.default_rng(0)
    rows = [
        (f"u{u}", "abcde"[int(rng.integers(5))], float(rng.integers(0, 20)))
        for u in range(30)
        for _ in range(int(rng.integers(1, 12)))
    ]
    dataset = _dataset(rows)
    split = leave_one_out(dataset)
    for u in range(split.n_users):
        events = split.events[u]
        train_events = events[: len(split.train[u])]
        assert len(split.train[u]) + 2 * (split.test[u] != PAD) == len(events)
        if split.test[u] == PAD:
            continue
        test_event, valid_event = split.target_event(u, "test"), split.target_event(u, "valid")
        # The held-out records are the last two, are not among the training records,
        # and no training event is later than them.
        assert events[-1] is test_event and events[-2] is valid_event
        assert all(e is not test_event and e is not valid_event for e in train_events)
        assert max(e.time for e in train_events) <= valid_event.time <= test_event.time
        assert split.history(u, "valid").tolist() == split.train[u].tolist()
        assert split.history(u, "test").tolist() == [*split.train[u], split.valid[u]]
        assert split.history_events(u, "test") == events[:-1]
    assert len(split.histories("test")) == len(split.targets("test")) == len(split.eval_users)


def test_unsorted_interactions_are_refused() -> None:
    dataset = _dataset(ROWS)
    dataset.interactions.reverse()
    with pytest.raises(ValueError, match="time order"):
        leave_one_out(dataset)
