"""Leave-one-out split for next-item evaluation.

Each user's events are taken in the Dataset's order (by time; ties keep the source order):
the last event is the test target, the second-last the validation target, the rest is
training. Models tune on the validation target only; the test target is read once, at the
end. A user with fewer than `min_events` events has no room for both targets and goes
entirely to training (their events still teach the model, they are just never scored).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from dynemb.data.types import Dataset, Interaction

logger = logging.getLogger(__name__)

Which = Literal["valid", "test"]
PAD = 0  # item index 0 is padding; real items are 1..n_items


@dataclass
class Split:
    """Per-user train sequences and held-out targets over one item index.

    `users[u]` indexes every per-user field. `valid[u]`/`test[u]` are item indices, or
    PAD for a user kept entirely in training (see `eval_users`).
    """

    item_index: dict[str, int]  # item_id -> 1..n_items
    item_ids: list[str]  # inverse of item_index; item_ids[0] is "" (padding)
    users: list[str]
    train: list[np.ndarray]  # int64 item indices, time order
    valid: np.ndarray  # (n_users,) int64
    test: np.ndarray  # (n_users,) int64
    events: list[list[Interaction]]  # every event of the user (train, then valid, then test)
    min_events: int
    # Items that do not exist at training time (`withhold`): no training event has them.
    withheld: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def n_items(self) -> int:
        return len(self.item_ids) - 1

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def eval_users(self) -> np.ndarray:
        """Users that own a validation and a test target (the rows every metric averages)."""
        return np.flatnonzero(self.test != PAD)

    def withhold(self, items: np.ndarray) -> Split:
        """The same targets, with every training event of `items` (item indices) removed:
        those items are new at test time, as a catalogue's newest items are. A user's
        validation and test events stay, whatever their item."""
        items = np.unique(np.asarray(items, np.int64))
        train, events = [], []
        for seq, user_events in zip(self.train, self.events, strict=True):
            keep = ~np.isin(seq, items)
            train.append(seq[keep])
            n = len(seq)
            held_out = user_events[n:]
            events.append([e for e, k in zip(user_events[:n], keep, strict=True) if k] + held_out)
        withheld = np.union1d(self.withheld, items)
        return replace(self, train=train, events=events, withheld=withheld)

    def history(self, user: int, which: Which) -> np.ndarray:
        """Item indices a model may read to predict `which`: train, plus valid for test."""
        if which == "valid":
            return self.train[user]
        if which == "test":
            if self.test[user] == PAD:
                return self.train[user]
            return np.append(self.train[user], self.valid[user])
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")

    def history_events(self, user: int, which: Which) -> list[Interaction]:
        """The Interaction records behind `history` (for models that read text/labels/times)."""
        return self.events[user][: len(self.history(user, which))]

    def target_event(self, user: int, which: Which) -> Interaction:
        """The held-out Interaction itself (its time is the query time of the prediction)."""
        if self.test[user] == PAD:
            raise ValueError(f"user {self.users[user]!r} has no held-out events")
        return self.events[user][-2 if which == "valid" else -1]

    def histories(self, which: Which) -> list[np.ndarray]:
        """`history` of every evaluated user, in `eval_users` order."""
        return [self.history(int(u), which) for u in self.eval_users]

    def targets(self, which: Which) -> np.ndarray:
        """Target item of every evaluated user, in `eval_users` order."""
        if which not in ("valid", "test"):
            raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
        column = self.valid if which == "valid" else self.test
        return column[self.eval_users]


def build_item_index(dataset: Dataset) -> dict[str, int]:
    """Catalogue order first, then items seen only in interactions; 0 stays free for padding."""
    index: dict[str, int] = {}
    for item_id in dataset.items:
        index.setdefault(item_id, len(index) + 1)
    for event in dataset.interactions:
        index.setdefault(event.item_id, len(index) + 1)
    return index


def leave_one_out(dataset: Dataset, min_events: int = 3) -> Split:
    """Hold out each user's last event for test and second-last for validation.

    Relies on `dataset.interactions` being sorted by (user, time) with ties in source order,
    so "last" is well defined; users with fewer than `min_events` (at least 3) events are
    not evaluated and all their events are training data.
    """
    if min_events < 3:
        raise ValueError("min_events must be at least 3 (one train, one valid, one test event)")
    item_index = build_item_index(dataset)
    item_ids = [""] * (len(item_index) + 1)
    for item_id, idx in item_index.items():
        item_ids[idx] = item_id

    users: list[str] = []
    train: list[np.ndarray] = []
    valid: list[int] = []
    test: list[int] = []
    events: list[list[Interaction]] = []
    for user_id, user_events in dataset.by_user().items():
        times = [e.time for e in user_events]
        if any(b < a for a, b in itertools.pairwise(times)):
            raise ValueError(f"interactions of user {user_id!r} are not in time order")
        seq = np.fromiter((item_index[e.item_id] for e in user_events), np.int64, len(user_events))
        users.append(user_id)
        events.append(list(user_events))
        if len(seq) < min_events:
            train.append(seq)
            valid.append(PAD)
            test.append(PAD)
        else:
            train.append(seq[:-2])
            valid.append(int(seq[-2]))
            test.append(int(seq[-1]))

    split = Split(
        item_index=item_index,
        item_ids=item_ids,
        users=users,
        train=train,
        valid=np.asarray(valid, np.int64),
        test=np.asarray(test, np.int64),
        events=events,
        min_events=min_events,
    )
    logger.info(
        "leave-one-out on %s: %d users (%d evaluated), %d items, %d train events",
        dataset.name,
        split.n_users,
        len(split.eval_users),
        split.n_items,
        sum(len(t) for t in train),
    )
    return split
