"""One epoch loop with early stopping on validation NDCG@10, shared by dynemb and SASRec:
train an epoch, validate, keep the best epoch's weights, stop after `patience` epochs
without a better score or when the time budget runs out, then restore the best weights."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of training reports back to the loop."""

    loss: float  # mean over the epoch's targets
    examples: int  # targets trained on
    out_of_time: bool = False  # the budget ran out inside the epoch: stop after validating


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    examples: int
    loss: float
    valid_ndcg10: float
    best_ndcg10: float
    best_epoch: int
    seconds: float  # since training started


@dataclass
class LoopResult:
    epochs: list[EpochReport]
    best_epoch: int  # 0: no epoch finished (the initial weights are kept)
    best_valid_ndcg10: float
    seconds: float


def run_epochs(
    model: nn.Module,
    train_epoch: Callable[[int], EpochStats],
    validate: Callable[[], float],
    max_epochs: int,
    patience: int,
    on_epoch: Callable[[EpochReport], None] | None = None,
    started: float | None = None,
) -> LoopResult:
    """Run up to `max_epochs`; `model` ends in eval mode with the best epoch's weights."""
    started = time.perf_counter() if started is None else started
    best_score, best_epoch = float("-inf"), 0
    best_state = copy.deepcopy(model.state_dict())
    epochs: list[EpochReport] = []
    for epoch in range(1, max_epochs + 1):
        model.train()
        stats = train_epoch(epoch)
        score = validate()
        if score > best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
        report = EpochReport(
            epoch=epoch,
            examples=stats.examples,
            loss=stats.loss,
            valid_ndcg10=score,
            best_ndcg10=best_score,
            best_epoch=best_epoch,
            seconds=time.perf_counter() - started,
        )
        epochs.append(report)
        logger.info(
            "epoch %d: %d examples, loss %.4f, valid ndcg@10 %.4f (best %.4f @ %d), %.0f s",
            epoch,
            stats.examples,
            stats.loss,
            score,
            best_score,
            best_epoch,
            report.seconds,
        )
        if on_epoch is not None:
            on_epoch(report)
        if stats.out_of_time or epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return LoopResult(epochs, best_epoch, best_score, time.perf_counter() - started)
