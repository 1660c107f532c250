"""Items a user already had, left out of the training softmax.

The quality protocol ranks only items the user has not interacted with yet (seen items
excluded, the target keeps its score), and so does a caller that filters seen items. A
model trained with those items in its softmax spends capacity pushing them down; leaving
them out of the loss trains for the ranking that is read. Shared by dynemb's and SASRec's
training loops so both models get the same treatment.
"""

from __future__ import annotations

import numpy as np
import torch

# Finite, so a row that had seen nearly every item still has a defined softmax.
SEEN_LOGIT = -1e9


def seen_before(history: np.ndarray, positions: np.ndarray, n_items: int) -> np.ndarray:
    """(P, n_items) bool: column i is True when item index i + 1 occurs in `history[:p]`,
    one row per p in `positions` (item indices are 1..n_items; 0 is padding)."""
    history = np.asarray(history, dtype=np.int64)
    first = np.full(n_items + 1, np.iinfo(np.int64).max, np.int64)
    np.minimum.at(first, history, np.arange(len(history)))
    return first[None, 1:] < np.asarray(positions, dtype=np.int64)[:, None]


def exclude_seen(logits: torch.Tensor, seen: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`logits` (N, n_items) with the `seen` (N, n_items) items set to SEEN_LOGIT, except each
    row's own target (0-based; rows with a negative target are ignored by the loss)."""
    masked = seen.clone()
    rows = torch.nonzero(targets >= 0).squeeze(1)
    masked[rows, targets[rows]] = False
    return logits.masked_fill(masked, SEEN_LOGIT)
