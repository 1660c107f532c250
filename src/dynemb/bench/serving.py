"""`dynemb bench`: the served pipeline side by side with the same code in-process and with
what a user would write instead, on one machine, one repository, the same users.

- A, in-process: the pipeline with everything the served path has (ONNX Runtime,
  per-item caches), batches of 32, one process per core: the compute limit.
- B, a plain FastAPI/uvicorn server, one worker per core, running the same trained
  networks through the plain eager pipeline per request (no cache, no batching), over HTTP.
- C, the Triton ensembles over gRPC with the project's client, one user per request.

B and C are driven by the same closed-loop load generator at each concurrency. Results:
users/s, p50/p95/p99, failures, the ratios C/A and C/B, p99 at half of C's saturation
throughput over C's single-client p50, Triton's per-stage batching, the caches' hit
rates, perf_analyzer's cross-check and breakdown, and a memory soak.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynemb.bench import perf, served
from dynemb.bench.closedloop import LoadResult, closed_loop
from dynemb.bench.context import (
    ModelStats,
    RunContext,
    collect_context,
    context_markdown,
    served_settings,
    stats_markdown,
    write_results,
)
from dynemb.bench.histories import HistorySet, movielens, synthetic_with_images
from dynemb.bench.inprocess import (
    BATCH,
    InProcessResult,
    StageCosts,
    batches,
    inprocess_throughput,
    pipeline_dims,
    stage_costs,
)
from dynemb.bench.soak import SoakResult
from dynemb.errors import UsageError
from dynemb.pipeline import Pipeline, eager_uncached
from dynemb.processes import tree_rss
from dynemb_client import AsyncInterestClient

log = logging.getLogger(__name__)

FULL_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
QUICK_CONCURRENCY = (1, 4, 16)
BASELINE_MS_PER_USER = 20.0  # the "today": eager, uncached, batch 32, one thread
PERF_ANALYZER_TOLERANCE = 0.15


@dataclass
class ServingOptions:
    repository: Path
    out_dir: Path
    cache: Path
    stem: str = "serving"
    quick: bool = False
    concurrencies: tuple[int, ...] = FULL_CONCURRENCY
    seconds: float = 15.0
    warmup_s: float = 3.0
    data: tuple[str, ...] = ("ml-100k", "synthetic-images")
    max_users: int | None = None
    perf_analyzer: bool = True
    soak_minutes: float = 5.0
    soak_concurrency: int = 16
    processes: int = os.cpu_count() or 1  # A's processes and B's workers: one per core
    command: str = ""

    @classmethod
    def quick_run(cls, repository: Path, out_dir: Path, cache: Path, command: str = ""):
        return cls(
            repository,
            out_dir,
            cache,
            stem="serving-quick",
            quick=True,
            concurrencies=QUICK_CONCURRENCY,
            seconds=3.0,
            warmup_s=1.0,
            data=("ml-100k",),
            max_users=128,
            perf_analyzer=False,
            soak_minutes=0.0,
            command=command,
        )


@dataclass
class LoadPoint:
    concurrency: int
    calls: int
    failed: int
    users_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    errors: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, load: LoadResult) -> LoadPoint:
        return cls(
            load.concurrency,
            load.calls,
            load.failed,
            round(load.users_per_s, 2),
            load.percentile(50),
            load.percentile(95),
            load.percentile(99),
            load.errors,
        )


@dataclass
class Ratios:
    served_over_inprocess: float  # C's best throughput / A's
    served_over_fastapi: dict[int, float]  # C / B at each concurrency
    served_over_fastapi_min_at_16_plus: float | None
    p99_half_saturation_over_p50_single: float | None
    half_saturation_concurrency: int | None  # the point whose p99 that is


@dataclass
class DataResult:
    data: str
    description: str
    synthetic: bool
    users: int
    inprocess: InProcessResult
    costs: list[StageCosts]
    plain: list[LoadPoint]
    triton: list[LoadPoint]
    triton_stages: dict[int, dict[str, ModelStats]]
    caches: dict[str, dict[str, float]]
    perf_analyzer: list[perf.PerfPoint]
    ratios: Ratios


@dataclass
class TargetCheck:
    target: str
    measured: str
    met: bool


@dataclass
class ServingResult:
    context: RunContext
    options: dict[str, object]
    data: list[DataResult]
    ratios: Ratios  # of the first data set (MovieLens-100k in a full run)
    soak: SoakResult | None
    targets: list[TargetCheck]


BENCH_DATA = ("ml-100k", "synthetic-images")


def load_histories(name: str, options: ServingOptions) -> HistorySet:
    if name == "ml-100k":
        return movielens(options.repository, options.cache, options.max_users)
    if name == "synthetic-images":
        return synthetic_with_images(options.max_users or 256)
    check_data([name])
    raise AssertionError(f"no loader for {name!r}")  # BENCH_DATA and the loaders disagree


def check_data(names: Sequence[str]) -> None:
    """Every name one of BENCH_DATA, and at least one."""
    if not names:
        raise UsageError(f"no benchmark data named: {' or '.join(BENCH_DATA)}, or both")
    unknown = [name for name in names if name not in BENCH_DATA]
    if unknown:
        raise UsageError(f"unknown benchmark data {unknown[0]!r}: {' or '.join(BENCH_DATA)}")


def check_options(options: ServingOptions) -> None:
    """What the options must be before anything runs: --data ',' ran nothing and ended in
    an IndexError, a negative --seconds measured nothing, and a --stem with a path in it
    wrote the results outside --out-dir."""
    check_data(options.data)
    if not (math.isfinite(options.seconds) and options.seconds > 0):
        raise UsageError(f"seconds must be a positive number, got {options.seconds}")
    if not (math.isfinite(options.soak_minutes) and options.soak_minutes >= 0):
        raise UsageError(f"soak minutes must be >= 0 (0: no soak), got {options.soak_minutes}")
    stem = options.stem
    if not stem or stem in (".", "..") or Path(stem).name != stem:
        raise UsageError(f"stem must be a file name (--out-dir is the folder), got {stem!r}")


def serving_benchmark(
    options: ServingOptions, say: Callable[[str], None] = log.info
) -> ServingResult:
    check_options(options)  # before anything runs
    context = collect_context(data="see each data set's description")
    if context.busy:
        say(f"WARNING: {context.load_warning()}")
    results, soak = [], None
    for name in options.data:
        histories = load_histories(name, options)
        say(f"{name}: {histories.description}")
        result, soaked = bench_data(histories, options, context, say)
        results.append(result)
        soak = soak or soaked
    context.finish()
    out = ServingResult(
        context,
        {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
        results,
        results[0].ratios,
        soak,
        targets(results, soak),
    )
    write(out, options)
    return out


def bench_data(
    histories: HistorySet, options: ServingOptions, context: RunContext, say
) -> tuple[DataResult, SoakResult | None]:
    log_dir = options.cache / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    concurrencies = list(options.concurrencies)
    soak = None
    with served.triton(options.repository, log_dir) as server:
        url = server.config.grpc_url
        if not context.served:
            import tritonclient.grpc as grpcclient

            admin = grpcclient.InferenceServerClient(url)
            context.versions["tritonserver"] = admin.get_server_metadata(as_json=True)["version"]
            context.served = served_settings(
                {m: admin.get_model_config(m, as_json=True) for m in server.config.models}
            )
            admin.close()
        perf_points: list[perf.PerfPoint] = []
        cross_check = None
        if options.perf_analyzer and not histories.synthetic:
            cross_check = perf_analyzer_check(url, histories, options, perf_points)
        also = ", each followed by perf_analyzer" if cross_check else ""
        say(f"C (Triton, gRPC): concurrency {concurrencies}, {options.seconds:g} s each{also}")
        triton_points = served.triton_sweep(
            url, histories, concurrencies, options.seconds, options.warmup_s, cross_check
        )
        metrics_url = f"http://{server.config.host}:{server.config.metrics_port}/metrics"
        caches = served.cache_metrics(metrics_url)
        if options.soak_minutes > 0 and not histories.synthetic:
            minutes, clients = options.soak_minutes, options.soak_concurrency
            say(f"memory soak: {minutes:g} min at concurrency {clients}")
            soak = soak_run(server, histories, options)
    say(f"B (plain FastAPI, {options.processes} workers): concurrency {concurrencies}")
    with served.plain_server(options.repository, options.processes, log_dir) as url:
        plain_points = served.plain_sweep(
            url, histories, concurrencies, options.seconds, options.warmup_s
        )
    say(f"A (in-process, {options.processes} processes, batches of {BATCH})")
    inprocess = inprocess_throughput(
        options.repository, histories, options.processes, options.seconds
    )
    say("per-stage costs (one thread)")
    costs = stage_cost_table(options.repository, histories)
    triton = [LoadPoint.of(p.load) for p in triton_points]
    plain = [LoadPoint.of(p.load) for p in plain_points]
    return (
        DataResult(
            data=histories.name,
            description=histories.description,
            synthetic=histories.synthetic,
            users=len(histories),
            inprocess=inprocess,
            costs=costs,
            plain=plain,
            triton=triton,
            triton_stages={p.load.concurrency: p.stages for p in triton_points},
            caches=caches,
            perf_analyzer=perf_points,
            ratios=ratios(inprocess, plain, triton),
        ),
        soak,
    )


def stage_cost_table(repository: Path, histories: HistorySet) -> list[StageCosts]:
    """Per-stage ms per user: eager without caches (what served before), the optimised
    path on a cold cache (first pass) and warm (second pass); batch 32 and batch 1."""
    eager = Pipeline.from_repository(repository, eager_uncached())
    dims = pipeline_dims(eager)
    out = []
    for size in (BATCH, 1):
        work = batches(histories, dims, size)[: (64 if size == 1 else None)]
        out.append(stage_costs(eager, work, "eager, no cache", size))
        optimised = Pipeline.from_repository(repository)
        out.append(stage_costs(optimised, work, "optimised, cold caches", size))
        out.append(stage_costs(optimised, work, "optimised, warm caches", size))
    return out


def ratios(inprocess: InProcessResult, plain: list[LoadPoint], triton: list[LoadPoint]) -> Ratios:
    best = max(p.users_per_s for p in triton)
    by_c = {p.concurrency: p for p in plain}
    over_b = {
        p.concurrency: round(p.users_per_s / by_c[p.concurrency].users_per_s, 3)
        for p in triton
        if p.concurrency in by_c and by_c[p.concurrency].users_per_s > 0
    }
    high = [r for c, r in over_b.items() if c >= 16]
    single = next((p for p in triton if p.concurrency == 1), None)
    # Half of saturation: the lowest concurrency whose throughput reaches half of C's best.
    half = next(
        (p for p in sorted(triton, key=lambda p: p.concurrency) if p.users_per_s >= best / 2), None
    )
    p99_ratio = (
        half.p99_ms / single.p50_ms
        if half is not None and single is not None and half.p99_ms and single.p50_ms
        else None
    )
    return Ratios(
        served_over_inprocess=round(best / inprocess.users_per_s, 3),
        served_over_fastapi=over_b,
        served_over_fastapi_min_at_16_plus=min(high) if high else None,
        p99_half_saturation_over_p50_single=round(p99_ratio, 3) if p99_ratio else None,
        half_saturation_concurrency=half.concurrency if half else None,
    )


def perf_analyzer_check(
    url: str, histories: HistorySet, options: ServingOptions, points: list[perf.PerfPoint]
) -> Callable[[int], None]:
    """perf_analyzer on the same server and the same users, one concurrency at a time:
    the returned function measures one and appends it to `points`."""
    binary = perf.perf_analyzer_binary()
    libs = perf.library_dir(options.cache)
    dims = pipeline_dims(Pipeline.from_repository(options.repository))
    data = perf.input_data(histories, dims, options.cache / "perf_analyzer_input.json")
    window = int(1000 * max(options.seconds / 3, 2))

    def measure(c: int) -> None:
        try:
            points.append(perf.run(binary, libs, url, "user_interest", data, c, window))
        except perf.PerfAnalyzerError as exc:  # recorded, not fatal: the rest still counts
            log.warning("perf_analyzer at concurrency %d: %s", c, exc)
            points.append(perf.PerfPoint(c, 0.0, 0.0, 0.0, error=str(exc)[-500:]))

    return measure


def soak_run(server, histories: HistorySet, options: ServingOptions) -> SoakResult:
    return asyncio.run(_soak(server, histories, options))


async def _soak(server, histories: HistorySet, options: ServingOptions) -> SoakResult:
    url, pid = server.config.grpc_url, server.process.pid
    seconds = 60 * options.soak_minutes
    samples: list[float] = []
    async with AsyncInterestClient(url, retries=0, timeout_s=60) as client:
        one, _ = await served.one_user_calls(client, histories)

        async def sample() -> None:
            while True:
                samples.append(tree_rss(pid) / 2**20)
                await asyncio.sleep(15)

        await closed_loop(one, options.soak_concurrency, 30.0, warmup_s=0.0)  # warm-up
        sampler = asyncio.create_task(sample())
        load = await closed_loop(one, options.soak_concurrency, seconds, warmup_s=0.0)
        sampler.cancel()
        samples.append(tree_rss(pid) / 2**20)
    return SoakResult(
        minutes=options.soak_minutes,
        concurrency=options.soak_concurrency,
        rss_after_warmup_mb=round(samples[0], 1),
        rss_end_mb=round(samples[-1], 1),
        samples_mb=[round(s, 1) for s in samples],
        calls=load.calls,
        failed=load.failed,
    )


def targets(results: list[DataResult], soak: SoakResult | None) -> list[TargetCheck]:
    out = []
    for r in results:
        tag = f"[{r.data}]"
        q = r.ratios
        out.append(
            TargetCheck(
                f"{tag} C >= 0.8 x A at saturation",
                f"C/A = {q.served_over_inprocess:.3f}",
                q.served_over_inprocess >= 0.8,
            )
        )
        if q.served_over_fastapi_min_at_16_plus is not None:
            out.append(
                TargetCheck(
                    f"{tag} C >= 3 x B at concurrency >= 16",
                    "C/B = "
                    + ", ".join(
                        f"{v:.2f} at {c}" for c, v in q.served_over_fastapi.items() if c >= 16
                    ),
                    q.served_over_fastapi_min_at_16_plus >= 3.0,
                )
            )
        warm = next(c for c in r.costs if c.batch == BATCH and c.variant.endswith("warm caches"))
        eager = next(c for c in r.costs if c.batch == BATCH and c.variant.startswith("eager"))
        out.append(
            TargetCheck(
                f"{tag} in-process cost per user (batch 32, one thread) <= "
                f"{BASELINE_MS_PER_USER / 3:.2f} ms (3x below {BASELINE_MS_PER_USER:g} ms)",
                f"{warm.total:.2f} ms ({BASELINE_MS_PER_USER / warm.total:.1f}x below "
                f"{BASELINE_MS_PER_USER:g} ms; {eager.total / warm.total:.1f}x below the eager "
                f"uncached pipeline's {eager.total:.2f} ms in this run)",
                warm.total <= BASELINE_MS_PER_USER / 3,
            )
        )
        single = next((p for p in r.triton if p.concurrency == 1), None)
        if single is not None and single.p50_ms is not None:
            out.append(
                TargetCheck(
                    f"{tag} served single-user p50 <= 12 ms",
                    f"{single.p50_ms:.2f} ms",
                    single.p50_ms <= 12.0,
                )
            )
        if q.p99_half_saturation_over_p50_single is not None:
            out.append(
                TargetCheck(
                    f"{tag} p99 at half saturation <= 2 x single-user p50",
                    f"{q.p99_half_saturation_over_p50_single:.2f}x (concurrency "
                    f"{q.half_saturation_concurrency})",
                    q.p99_half_saturation_over_p50_single <= 2.0,
                )
            )
        failed = sum(p.failed for p in (*r.triton, *r.plain))
        out.append(TargetCheck(f"{tag} 0 failed requests", f"{failed} failed", failed == 0))
        by_c = {p.concurrency: p for p in r.triton}
        for point in r.perf_analyzer:
            c_point = by_c.get(point.concurrency)
            if c_point is None or not c_point.users_per_s:
                continue
            if point.error is not None:
                out.append(
                    TargetCheck(
                        f"{tag} perf_analyzer within 15% of C at concurrency {point.concurrency}",
                        "no stable perf_analyzer measurement",
                        False,
                    )
                )
                continue
            gap = point.users_per_s / c_point.users_per_s - 1
            out.append(
                TargetCheck(
                    f"{tag} perf_analyzer within 15% of C at concurrency {point.concurrency}",
                    f"{point.users_per_s:.1f} vs {c_point.users_per_s:.1f} users/s ({gap:+.1%})",
                    abs(gap) <= PERF_ANALYZER_TOLERANCE,
                )
            )
    if soak is not None:
        out.append(
            TargetCheck(
                f"server RSS after a {soak.minutes:g}-minute soak within 10% of after warm-up",
                f"{soak.rss_after_warmup_mb:.0f} -> {soak.rss_end_mb:.0f} MB "
                f"({soak.growth - 1:+.1%}), {soak.failed} failed of {soak.calls}",
                soak.growth <= 1.10 and soak.failed == 0,
            )
        )
    return out


# --- writing the results -----------------------------------------------------------------


def write(result: ServingResult, options: ServingOptions) -> None:
    stem = options.out_dir / options.stem
    write_results(stem, result, result.context, render_markdown(result, options))
    plot(result, stem.with_suffix(".png"))


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _latencies(point: LoadPoint) -> str:
    return f"{_ms(point.p50_ms)} / {_ms(point.p95_ms)} / {_ms(point.p99_ms)}"


def render_markdown(result: ServingResult, options: ServingOptions) -> str:
    mode = "QUICK (smoke run, not for the record)" if options.quick else "full"
    lines = [
        "# Serving: Triton ensembles vs the same code in-process vs a plain web server",
        "",
        f"Mode: {mode}. One user per request for B and C; A runs batches of {BATCH}. "
        f"{options.seconds:g} s measured per point after {options.warmup_s:g} s of warm-up; "
        "closed-loop clients from one asyncio process on the same machine.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    lines += [
        f"| {t.target} | {t.measured} | {'yes' if t.met else '**no**'} |" for t in result.targets
    ]
    for r in result.data:
        lines += ["", f"## {r.data}: {r.description}", ""]
        a = r.inprocess
        lines += [
            f"A (in-process, {a.processes} processes, batches of {a.batch}): "
            f"**{a.users_per_s:.1f} users/s** (batch p50 {a.batch_p50_ms:.1f} ms, "
            f"p99 {a.batch_p99_ms:.1f} ms).",
            "",
            "| concurrency | B users/s | B p50 / p95 / p99 ms | B failed | C users/s | "
            "C p50 / p95 / p99 ms | C failed | C/B | C/A |",
            "|---:|---:|---|---:|---:|---|---:|---:|---:|",
        ]
        plain = {p.concurrency: p for p in r.plain}
        for c_point in r.triton:
            b = plain.get(c_point.concurrency)
            c_over_a = c_point.users_per_s / r.inprocess.users_per_s
            b_cells = f"{b.users_per_s:.1f} | {_latencies(b)} | {b.failed}" if b else "– | – | –"
            ratio = r.ratios.served_over_fastapi.get(c_point.concurrency)
            lines.append(
                f"| {c_point.concurrency} | {b_cells} | {c_point.users_per_s:.1f} | "
                f"{_latencies(c_point)} | "
                f"{c_point.failed} | {'–' if ratio is None else f'{ratio:.2f}'} | {c_over_a:.2f} |"
            )
        q = r.ratios
        lines += ["", *reading(r, result.context.machine.get("cpu_count") or 1)]
        lines += [
            "",
            f"Ratios: C/A (saturation) **{q.served_over_inprocess:.3f}**; C/B at >= 16 clients "
            f"(min) **{_fmt(q.served_over_fastapi_min_at_16_plus)}**; p99 at half saturation "
            f"(concurrency {q.half_saturation_concurrency}) / single-client p50 "
            f"**{_fmt(q.p99_half_saturation_over_p50_single)}**.",
            "",
            "### In-process cost per user by stage (ms, one thread)",
            "",
            "| variant | users per call | " + " | ".join(r.costs[0].ms_per_user) + " | total |",
            "|---|---:|" + "---:|" * (len(r.costs[0].ms_per_user) + 1),
        ]
        for cost in r.costs:
            cells = " | ".join(f"{v:.3f}" for v in cost.ms_per_user.values())
            lines.append(f"| {cost.variant} | {cost.batch} | {cells} | {cost.total:.2f} |")
        lines += ["", "### Per-item caches after the sweep (Triton's metrics endpoint)", ""]
        lines += [
            "| model / cache | hits | misses | hit rate | entries | MB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, stats in sorted(r.caches.items()):
            lines.append(
                f"| {key} | {stats.get('hits', 0):.0f} | {stats.get('misses', 0):.0f} | "
                f"{stats.get('hit_rate', 0):.1%} | {stats.get('entries', 0):.0f} | "
                f"{stats.get('bytes', 0) / 2**20:.1f} |"
            )
        if r.triton_stages:
            busiest = max(r.triton_stages)
            lines += [
                "",
                f"### Triton per-stage statistics at concurrency {busiest}",
                "",
                stats_markdown(r.triton_stages[busiest]),
            ]
        if r.perf_analyzer:
            lines += [
                "",
                "### perf_analyzer on `user_interest` (same server, same users)",
                "",
                "| concurrency | users/s | p50 ms | p99 ms | C users/s |",
                "|---:|---:|---:|---:|---:|",
            ]
            by_c = {p.concurrency: p for p in r.triton}
            for p in r.perf_analyzer:
                c_point = by_c.get(p.concurrency)
                c_cell = f"{c_point.users_per_s:.1f}" if c_point else "–"
                lines.append(
                    f"| {p.concurrency} | {p.users_per_s:.1f} | {p.p50_ms:.1f} | "
                    f"{p.p99_ms:.1f} | {c_cell} |"
                )
            measured = [p for p in r.perf_analyzer if p.error is None] or r.perf_analyzer
            last = measured[-1]
            lines += [
                "",
                f"Composing models at concurrency {last.concurrency} (µs per request):",
                "",
                "| stage | inferences | executions | avg batch | queue | compute input | "
                "compute infer | compute output |",
                "|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
            for name, s in last.stages.items():
                batch = s.inferences / s.executions if s.executions else 0
                lines.append(
                    f"| {name} | {s.inferences} | {s.executions} | {batch:.2f} | "
                    f"{s.queue_us:.0f} | {s.compute_input_us:.0f} | {s.compute_infer_us:.0f} | "
                    f"{s.compute_output_us:.0f} |"
                )
    if result.soak is not None:
        s = result.soak
        lines += [
            "",
            f"## Memory soak ({s.minutes:g} min at concurrency {s.concurrency})",
            "",
            f"tritonserver + stubs RSS: {s.rss_after_warmup_mb:.0f} MB after warm-up, "
            f"{s.rss_end_mb:.0f} MB at the end ({s.growth - 1:+.1%}); {s.calls} calls, "
            f"{s.failed} failed. Samples (MB, every 15 s): {s.samples_mb}",
        ]
    lines += ["", f"![latency vs throughput]({options.stem}.png)", "", "## Context", ""]
    lines.append(context_markdown(result.context))
    return "\n".join(lines) + "\n"


def reading(r: DataResult, cores: int) -> list[str]:
    """What the numbers say about the two ratio targets, from the numbers themselves."""
    best = max(r.triton, key=lambda p: p.users_per_s)
    a_cpu = 1000 * r.inprocess.processes / r.inprocess.users_per_s
    c_cpu = 1000 * cores / best.users_per_s
    out = [
        f"Reading: at saturation A spends {a_cpu:.2f} ms of CPU per user (its "
        f"{r.inprocess.processes} processes' time / users) and C at most {c_cpu:.2f} ms "
        f"({cores} cores / "
        f"{best.users_per_s:.0f} users/s at {best.concurrency} clients, the load generator "
        f"included): the {c_cpu - a_cpu:.2f} ms between them is serving overhead (gRPC, the "
        "ensemble's scheduling, and a Python-backend request per stage per user)."
    ]
    half = next(
        (p for p in r.triton if p.concurrency == r.ratios.half_saturation_concurrency), None
    )
    single = next((p for p in r.triton if p.concurrency == 1), None)
    if half is not None and single is not None and single.p50_ms:
        floor = 1000 * half.concurrency / half.users_per_s
        out.append(
            f"A closed loop of {half.concurrency} clients at {half.users_per_s:.0f} users/s "
            f"holds each request {floor:.1f} ms on average (Little's law: clients / "
            f"throughput), {floor / single.p50_ms:.2f}x the single-client p50, before any "
            "spread: p99 <= 2x that p50 at half saturation needs throughput that grows with "
            "clients faster than two cores allow here."
        )
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def plot(result: ServingResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(result.data), figsize=(6.5 * len(result.data), 5), squeeze=False
    )
    for ax, r in zip(axes[0], result.data, strict=True):
        for name, points, colour in (
            ("B plain FastAPI", r.plain, "tab:orange"),
            ("C Triton", r.triton, "tab:blue"),
        ):
            xs = [p.users_per_s for p in points]
            ok = [p for p in points if p.p99_ms is not None]  # a point of failures has none
            xs = [p.users_per_s for p in ok]
            ax.plot(xs, [p.p50_ms for p in ok], "o-", color=colour, label=f"{name} p50")
            ax.plot(xs, [p.p99_ms for p in ok], "s--", color=colour, label=f"{name} p99")
            for p in ok:
                ax.annotate(str(p.concurrency), (p.users_per_s, p.p99_ms), fontsize=7)
        ax.axvline(r.inprocess.users_per_s, color="tab:green", ls=":", label="A in-process (max)")
        ax.set_yscale("log")
        ax.set_xlabel("users/s")
        ax.set_ylabel("latency per request (ms)")
        ax.set_title(f"{r.data}" + (" (SYNTHETIC)" if r.synthetic else ""))
        ax.legend(fontsize=7)
    fig.suptitle("latency vs throughput; labels = concurrent clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["ServingOptions", "ServingResult", "serving_benchmark"]
