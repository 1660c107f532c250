"""Which runtime serves each torch stage fastest: torch eager vs ONNX Runtime, one thread,
at 1 and 32 users per call, on real stage inputs (MovieLens-100k users, and SYNTHETIC
users with images, which are the only ones that give image_cnn work); with each
runtime's largest difference from torch eager. The stages' default runtime
(`TorchStage.options`) is the one this sweep measured fastest (benchmarks/results/
runtimes.md); the per-item caches are off here, so the runtimes are compared on the same
work."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynemb import stages
from dynemb.bench.context import RunContext
from dynemb.bench.histories import HistorySet
from dynemb.bench.inprocess import batches, pipeline_dims
from dynemb.pipeline import Pipeline, eager_uncached, latest_version
from dynemb.serving.runtime import RUNTIMES
from dynemb.stages import RunnerOptions, load_runner

BATCHES = (1, 32)


@dataclass(frozen=True)
class RuntimePoint:
    data: str
    stage: str
    runtime: str
    batch: int
    ms_per_user: float
    max_abs_diff: float  # against torch eager on the same inputs


@dataclass
class RuntimeSweep:
    context: RunContext
    data: dict[str, str]  # name -> description
    points: list[RuntimePoint]

    def fastest(self, stage: str, batch: int) -> str:
        """The runtime with the lower total time over the data sets."""
        totals: dict[str, float] = {}
        for p in self.points:
            if p.stage == stage and p.batch == batch:
                totals[p.runtime] = totals.get(p.runtime, 0.0) + p.ms_per_user
        return min(totals, key=totals.__getitem__)


def stage_inputs(pipeline: Pipeline, inputs: list[dict[str, np.ndarray]], stage: str) -> list:
    """Each batch's inputs of `stage`, as the eager pipeline computes them."""
    out = []
    for x in inputs:
        tensors = pipeline.run(x, "recommend")
        spec = pipeline.runners[stage].spec
        out.append({t.name: tensors[t.name] for t in spec.inputs})
    return out


def sweep(
    repository: Path, sets: list[HistorySet], context: RunContext, repeats: int = 3
) -> RuntimeSweep:
    eager = Pipeline.from_repository(repository, eager_uncached())
    points = []
    for histories in sets:
        points += sweep_one(repository, eager, histories, repeats)
    context.finish()
    return RuntimeSweep(context, {h.name: h.description for h in sets}, points)


def sweep_one(repository, eager, histories: HistorySet, repeats: int) -> list[RuntimePoint]:
    dims = pipeline_dims(eager)
    points = []
    for batch in BATCHES:
        work = batches(histories, dims, batch)
        if batch == 1:
            work = work[:64]
        for name in stages.NAMES:
            if not stages.trainable(name):
                continue
            inputs = stage_inputs(eager, work, name)
            reference = [eager.runners[name](x) for x in inputs]
            directory = latest_version(repository / name)
            for runtime in RUNTIMES:
                runner = load_runner(directory, options=RunnerOptions(runtime=runtime))
                for x in inputs[:2]:
                    runner(x)  # warm: sessions primed, first-call costs paid
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    outs = [runner(x) for x in inputs]
                    best = min(best, time.perf_counter() - t0)
                users = sum(len(x[next(iter(x))]) for x in inputs)
                diff = max(
                    float(np.abs(out[key] - ref[key]).max())
                    for out, ref in zip(outs, reference, strict=True)
                    for key in ref
                )
                points.append(
                    RuntimePoint(histories.name, name, runtime, batch, 1000 * best / users, diff)
                )
    return points


def render_markdown(result: RuntimeSweep) -> str:
    from dynemb.bench.context import context_markdown

    lines = [
        "# Runtimes per torch stage: torch eager vs ONNX Runtime",
        "",
        __doc__.split("\n\n")[0].replace("\n", " "),
        "",
        *(f"- {name}: {description}" for name, description in result.data.items()),
        "",
        "Best of 3 passes; one intra-op thread; per-item caches off.",
        "",
        "| data | stage | users per call | runtime | ms per user | speed-up vs torch | "
        "max abs diff vs torch |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    by_key = {(p.data, p.stage, p.batch, p.runtime): p for p in result.points}
    for p in result.points:
        torch_ms = by_key[(p.data, p.stage, p.batch, "torch")].ms_per_user
        speedup = f"{torch_ms / p.ms_per_user:.2f}x" if p.ms_per_user > 1e-4 else "– (no work)"
        lines.append(
            f"| {p.data} | {p.stage} | {p.batch} | {p.runtime} | {p.ms_per_user:.3f} | "
            f"{speedup} | {p.max_abs_diff:.1e} |"
        )
    lines += ["", "Fastest:"]
    names = sorted({p.stage for p in result.points}, key=stages.NAMES.index)
    for name in names:
        picks = ", ".join(f"batch {b}: {result.fastest(name, b)}" for b in BATCHES)
        default = stages.get(name).options.runtime
        lines.append(f"- {name}: {picks}; serving default: {default}")
    lines += ["", "## Context", "", context_markdown(result.context)]
    return "\n".join(lines) + "\n"
