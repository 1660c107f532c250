"""Variant A of the serving benchmark, and the per-stage cost table: the pipeline
in-process, with everything the served path has (ONNX Runtime, per-item caches), batched,
one process per core. No network, no IPC: the compute limit of this machine."""

from __future__ import annotations

import multiprocessing as mp
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynemb.bench.histories import HistorySet
from dynemb.dims import Dims
from dynemb.ensembles import RECOMMEND_STEPS
from dynemb.pipeline import Pipeline
from dynemb.stages import RunnerOptions
from dynemb_client import build_inputs

BATCH = 32
TOP_K = 10


def batches(histories: HistorySet, dims: Dims, size: int = BATCH) -> list[dict[str, np.ndarray]]:
    """The users as wire tensors (what a server receives), `size` users per batch."""
    out = []
    for start in range(0, len(histories), size):
        users = histories.users[start : start + size]
        at = histories.at[start : start + size]
        out.append(build_inputs(users, at, dims.max_events, dims.max_labels, top_k=TOP_K))
    return out


def pipeline_dims(pipeline: Pipeline) -> Dims:
    return next(iter(pipeline.runners.values())).manifest.dims


@dataclass(frozen=True)
class StageCosts:
    """Milliseconds per user, by stage, at one batch size (one thread, one process)."""

    variant: str  # "eager, no cache" / "optimised, cold caches" / "optimised, warm caches"
    batch: int
    ms_per_user: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.ms_per_user.values())


def stage_costs(
    pipeline: Pipeline, inputs: list[dict[str, np.ndarray]], variant: str, batch: int
) -> StageCosts:
    """Time every stage of `recommend` over the batches (one pass), per user."""
    import torch

    torch.set_num_threads(1)
    spent = dict.fromkeys(RECOMMEND_STEPS, 0.0)
    users = 0
    for x in inputs:
        tensors = dict(x)
        users += len(x["EVENT_COUNT"])
        for name in RECOMMEND_STEPS:
            runner = pipeline.runners[name]
            step = {t.name: tensors[t.name] for t in runner.spec.inputs}
            t0 = time.perf_counter()
            runner.check(step)
            tensors.update(runner.trim(step, runner(step)))
            spent[name] += time.perf_counter() - t0
    return StageCosts(variant, batch, {k: 1000 * v / users for k, v in spent.items()})


@dataclass(frozen=True)
class InProcessResult:
    processes: int
    batch: int
    seconds: float
    users: int
    batch_p50_ms: float
    batch_p99_ms: float

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds


def _worker(repository, options, histories, seconds, barrier, results) -> None:
    import torch

    torch.set_num_threads(1)
    pipeline = Pipeline.from_repository(Path(repository), options)
    work = batches(histories, pipeline_dims(pipeline))
    for x in work:  # warm-up: every item's features into the caches, sessions primed
        pipeline.embed(x)
    barrier.wait()
    deadline = time.perf_counter() + seconds
    users, latencies, i = 0, [], 0
    while True:
        x = work[i % len(work)]
        t0 = time.perf_counter()
        pipeline.embed(x)
        t1 = time.perf_counter()
        if t1 > deadline:
            break
        users += len(x["EVENT_COUNT"])
        latencies.append(1000 * (t1 - t0))
        i += 1
    results.put((users, latencies))


def inprocess_throughput(
    repository: Path,
    histories: HistorySet,
    processes: int,
    seconds: float,
    options: Mapping[str, RunnerOptions] | None = None,
) -> InProcessResult:
    """`processes` processes run the pipeline over batches of 32 for `seconds` together."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [
        context.Process(
            target=_worker,
            args=(str(repository), options, histories, seconds, barrier, results),
            daemon=True,
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    collected = [results.get(timeout=seconds + 600) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    latencies = [ms for _, batch in collected for ms in batch]
    return InProcessResult(
        processes=processes,
        batch=BATCH,
        seconds=seconds,
        users=sum(users for users, _ in collected),
        batch_p50_ms=float(np.percentile(latencies, 50)),
        batch_p99_ms=float(np.percentile(latencies, 99)),
    )
