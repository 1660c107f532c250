"""Quality of sessions past the window, on the protocol of dynemb.evaluation.quality.

A session that has read n > L events holds a window of its newest w(n) events
(dynemb.sessions.state.window_after with the re-window block B): E_t is the embedding of
exactly those. B = 1 is the full model's answer (the newest L); a larger B makes an
update past the window a step instead of a recompute, and reads L - B + 1 .. L events.
Here each test user is taken to have streamed their history one event at a time from
the first: the prediction for the test target reads the newest w(n) of the n events
before it. Both modes are scored on the same trained models (paired per seed), over all
evaluated users and over those whose history exceeds L (the only ones that differ).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dynemb.data.types import Dataset
from dynemb.dims import DIMS
from dynemb.evaluation.metrics import format_mean_std, summarize
from dynemb.evaluation.quality import evaluate
from dynemb.evaluation.results import RunRecord, SeenMetrics, as_record, save_report
from dynemb.evaluation.runs import quiet, run_tasks, store_for
from dynemb.evaluation.split import leave_one_out
from dynemb.paths import RESULTS_DIR
from dynemb.sessions.state import window_after
from dynemb.training.train import Trained, TrainOptions, fit

logger = logging.getLogger(__name__)

METRIC = "ndcg@10"


@dataclass
class StreamingOptions:
    seeds: tuple[int, ...] = (0, 1, 2)
    blocks: tuple[int, ...] = (10, 25, 50)  # re-window blocks B compared with B = 1
    train: TrainOptions = field(default_factory=TrainOptions)
    out_dir: Path = RESULTS_DIR
    stem: str = "sessions-quality-ml100k"
    command: str = ""
    # Take the seeds an interrupted invocation finished (dynemb.evaluation.runs) from
    # `runs_dir` (None: the cache's).
    resume: bool = True
    runs_dir: Path | None = None


@dataclass
class StreamingRun:
    """One trained model (one seed): the full model's test metrics and each block's, over
    all evaluated users and over those past the window."""

    seed: int
    train_seconds: float
    valid_ndcg10: float
    full: SeenMetrics
    full_past: SeenMetrics
    blocks: dict[str, SeenMetrics]  # str(B) -> metrics (JSON keys are strings)
    blocks_past: dict[str, SeenMetrics]


@dataclass
class StreamingResult:
    data: str
    synthetic: bool
    protocol: str
    max_events: int
    evaluated_users: int
    users_past_window: int
    blocks: list[int]
    seeds: list[int]
    train_options: dict
    runs: list[StreamingRun]
    run: RunRecord

    def summary(self, block: int | None, past: bool = False) -> tuple[float, float]:
        """Mean and std over seeds of NDCG@10 (seen excluded); block None = full model."""
        values = []
        for r in self.runs:
            if block is None:
                metrics = r.full_past if past else r.full
            else:
                metrics = (r.blocks_past if past else r.blocks)[str(block)]
            values.append(metrics.excluded[METRIC])
        return summarize(values)

    def difference(self, block: int, past: bool = False) -> tuple[float, float]:
        """Mean and std over seeds of (block - full) NDCG@10, paired by seed."""
        return summarize(
            [
                (r.blocks_past if past else r.blocks)[str(block)].excluded[METRIC]
                - (r.full_past if past else r.full).excluded[METRIC]
                for r in self.runs
            ]
        )

    def within_one_std(self, block: int) -> bool | None:
        """The target: the streaming mode's mean within one seed-std of the full model's
        (None with one seed: no std to compare with)."""
        if len(self.runs) < 2:
            return None
        full_mean, full_std = self.summary(None)
        return abs(self.summary(block)[0] - full_mean) <= full_std


def window_limits(trained: Trained, users: np.ndarray, block: int) -> list[int]:
    """Events each user's test prediction reads when their history streamed through a
    session with re-window block `block`."""
    L = trained.builder.dims.max_events  # noqa: N806
    cuts = [trained.builder.eval_cut(int(u), "test") for u in users]
    return [window_after(0, n, L, block) for n in cuts]


def streaming_run(trained: Trained, blocks: Sequence[int]) -> StreamingRun:
    users = trained.split.eval_users
    past = past_window_users(trained)
    by_block, by_block_past = {}, {}
    for block in blocks:
        by_block[str(block)] = evaluate(trained, limit=window_limits(trained, users, block))
        by_block_past[str(block)] = evaluate(
            trained, users=past, limit=window_limits(trained, past, block)
        )
    return StreamingRun(
        seed=trained.options.seed,
        train_seconds=round(trained.seconds, 1),
        valid_ndcg10=trained.best_valid_ndcg10,
        full=evaluate(trained),
        full_past=evaluate(trained, users=past),
        blocks=by_block,
        blocks_past=by_block_past,
    )


def past_window_users(trained: Trained) -> np.ndarray:
    """Evaluated users with more than L events before their test target."""
    builder, users = trained.builder, trained.split.eval_users
    cuts = np.array([builder.eval_cut(int(u), "test") for u in users])
    return users[cuts > builder.dims.max_events]


@dataclass(frozen=True)
class StreamingSeed:
    """One seed's run, as a task (dynemb.evaluation.runs): train, then score the full
    model and each block."""

    train: TrainOptions
    blocks: tuple[int, ...]

    def identity(self) -> str:
        return repr(("streaming", quiet(self.train), self.blocks))

    def __call__(self, dataset: Dataset) -> StreamingRun:
        run = streaming_run(fit(dataset, leave_one_out(dataset), self.train), self.blocks)
        logger.info("seed %d: full %s", run.seed, run.full.excluded[METRIC])
        return run


def streaming_benchmark(dataset: Dataset, options: StreamingOptions) -> StreamingResult:
    """Train each seed once; score the full model and each block on test; write results."""
    started = time.perf_counter()
    record = RunRecord.now(options.command)
    split = leave_one_out(dataset)
    tasks = [StreamingSeed(replace(options.train, seed=s), options.blocks) for s in options.seeds]
    store = store_for(dataset, options.resume, options.runs_dir)
    runs = run_tasks(dataset, tasks, store=store)
    record.resumed_runs = store.reused
    record.total_seconds = round(time.perf_counter() - started, 1)
    result = StreamingResult(
        data=dataset.name,
        synthetic=dataset.synthetic,
        protocol=__doc__.split("\n\n", 1)[1].strip(),
        max_events=DIMS.max_events,
        evaluated_users=len(split.eval_users),
        users_past_window=len(runs[0].full_past.ndcg10_per_user),
        blocks=list(options.blocks),
        seeds=list(options.seeds),
        train_options=as_record(options.train),
        runs=runs,
        run=record,
    )
    save_report(result, options.out_dir, options.stem, render_markdown(result))
    store.clear()  # written: nothing left to resume
    return result


def render_markdown(result: StreamingResult) -> list[str]:
    L = result.max_events  # noqa: N806
    tag = " (SYNTHETIC data)" if result.synthetic else ""
    md = [
        f"# Sessions past the window: quality on {result.data}{tag}",
        "",
        result.protocol,
        "",
        f"{result.evaluated_users} evaluated users, {result.users_past_window} of them with "
        f"more than L = {L} events before their test target. Seeds {result.seeds}; NDCG@10 "
        "with seen items excluded, mean ± std over seeds; differences paired by seed.",
        "",
        "| mode | events read past L | NDCG@10, all users | difference | NDCG@10, users past L "
        "| difference | within one seed-std of the full model |",
        "|---|---|---|---|---|---|---|",
        f"| full model (B = 1) | {L} | {format_mean_std(*result.summary(None))} | – | "
        f"{format_mean_std(*result.summary(None, past=True))} | – | – |",
    ]
    for block in result.blocks:
        read = f"{L - block + 1}–{L}" if block > 1 else str(L)
        verdict = {True: "met", False: "MISSED", None: "– (one seed)"}[result.within_one_std(block)]
        md.append(
            f"| session, B = {block} | {read} | {format_mean_std(*result.summary(block))} | "
            f"{format_mean_std(*result.difference(block))} | "
            f"{format_mean_std(*result.summary(block, past=True))} | "
            f"{format_mean_std(*result.difference(block, past=True))} | {verdict} |"
        )
    md += [
        "",
        "| seed | train s | valid NDCG@10 | full | "
        + " | ".join(f"B = {b}" for b in result.blocks)
        + " |",
        "|---|---|---|---|" + "---|" * len(result.blocks),
    ]
    for r in result.runs:
        cells = [f"{r.blocks[str(b)].excluded[METRIC]:.4f}" for b in result.blocks]
        md.append(
            f"| {r.seed} | {r.train_seconds} | {r.valid_ndcg10:.4f} | "
            f"{r.full.excluded[METRIC]:.4f} | " + " | ".join(cells) + " |"
        )
    md += ["", "## Context", ""]
    return md
