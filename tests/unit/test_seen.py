"""Seen-item exclusion in the training softmax (dynemb.evaluation.seen), hand-checked."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from dynemb.evaluation.seen import SEEN_LOGIT, exclude_seen, seen_before


def test_seen_before_marks_items_of_the_history_prefix() -> None:
    history = np.array([3, 1, 3, 2])
    seen = seen_before(history, np.array([0, 1, 2, 4]), n_items=4)
    # column i is item index i + 1
    assert seen.tolist() == [
        [False, False, False, False],  # nothing read yet
        [False, False, True, False],  # {3}
        [True, False, True, False],  # {3, 1}
        [True, True, True, False],  # {3, 1, 2}; item 4 never
    ]


def test_seen_before_empty_history() -> None:
    assert not seen_before(np.array([], np.int64), np.array([0, 3]), n_items=2).any()


def test_exclude_seen_keeps_the_target_and_unseen_items() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    seen = torch.tensor(
        [[True, False, True, False], [True, True, False, False], [True, True, True, True]]
    )
    targets = torch.tensor([2, 3, -1])  # row 0's target was seen before: it keeps its score
    before = seen.clone()
    out = exclude_seen(logits, seen, targets)
    assert torch.equal(seen, before)  # the caller's mask is not modified
    assert out[0].tolist() == [SEEN_LOGIT, 2.0, 3.0, 4.0]
    assert out[1].tolist() == [SEEN_LOGIT, SEEN_LOGIT, 3.0, 4.0]
    assert (out[2] == SEEN_LOGIT).all()  # an ignored row: every seen item masked
    # The loss is the softmax over the unseen items and the target only.
    loss = F.cross_entropy(out[:2], targets[:2], reduction="none")
    expected = [
        -torch.log_softmax(torch.tensor([2.0, 3.0, 4.0]), 0)[1],
        -torch.log_softmax(torch.tensor([3.0, 4.0]), 0)[1],
    ]
    assert torch.allclose(loss, torch.stack(expected))
