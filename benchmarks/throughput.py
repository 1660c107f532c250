"""Throughput and latency of the served ensembles, variants side by side in one run.

    .venv/bin/python benchmarks/throughput.py --seconds 30

Builds a model repository from the synthetic catalogue into a temporary directory (or
reuses `--repository DIR`), starts its own tritonserver on free loopback ports, warms up,
then runs closed-loop clients (each sends its next request as soon as the last one is
answered) for each variant, bounded in time and in requests. Three comparisons, each as
ratios against its first variant:

  (a) server-side dynamic batching: 1 vs 4 vs 16 clients sending single-user
      `user_interest` requests, with what Triton's statistics say each stage ran
      (requests / executions = the average batch the dynamic batcher formed);
  (b) client-side batching: a caller that needs 8 users' embeddings sends 8 single
      requests one after another, 8 single requests at once, or one `embed_many` of 8;
  (c) `recommend` (adds retrieve) vs `user_interest`, 16 clients each.

Results go to benchmarks/results/throughput.{md,json} with the run's context
(benchmarks/common.py). The histories are synthetic and labelled so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from dynemb import stages
from dynemb.bench import context as common
from dynemb.data.synthetic import SyntheticConfig, generate
from dynemb.ensembles import ENSEMBLE_SPECS, STAGE_SPECS
from dynemb.manifest import Manifest
from dynemb.pipeline import latest_version
from dynemb.repository import BuildOptions, build_repository
from dynemb.server import ServerConfig, TritonServer, free_port
from dynemb_client import AsyncInterestClient, Event, InterestClient
from dynemb_client.requests import ModelShape, embedding_call

log = logging.getLogger("benchmarks.throughput")
console = Console(stderr=True)

# Small and seeded: 32 users of 50-80 events, so every history fills the L = 50 window.
HISTORY_CONFIG = SyntheticConfig(
    n_categories=6, items_per_category=20, n_users=32, events_per_user=(50, 80), seed=0
)
K = 10
GROUP = 8  # users one caller needs at once in comparison (b)
SETUP_TIMEOUT_S = 120.0  # connecting every client of a variant


# --- what one closed-loop client does -------------------------------------------------


class Caller:
    """One client's connection plus the call it repeats; returns the users served."""

    users_per_call = 1

    def __init__(self, url: str, histories: Sequence[Sequence[Event]], offset: int) -> None:
        self.histories = histories
        self.next = offset  # clients start at different users, then rotate through all
        self.client = InterestClient(url, retries=0, timeout_s=60)  # a failure counts
        self.client.model_shape()  # metadata fetched before timing starts

    def take(self, n: int) -> list[Sequence[Event]]:
        picked = [self.histories[(self.next + i) % len(self.histories)] for i in range(n)]
        self.next += n
        return picked

    def __call__(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        self.client.close()


class InterestOne(Caller):
    def __call__(self) -> int:
        self.client.embed(self.take(1)[0])
        return 1


class RecommendOne(Caller):
    def __call__(self) -> int:
        if len(self.client.recommend(self.take(1)[0], k=K)) != K:
            raise AssertionError(f"recommend returned fewer than {K} items")
        return 1


class InterestMany(Caller):
    users_per_call = GROUP

    def __call__(self) -> int:
        return len(self.client.embed_many(self.take(self.users_per_call)))


class InterestSequential(Caller):
    """The same GROUP users as single requests, one after another."""

    users_per_call = GROUP

    def __call__(self) -> int:
        for history in self.take(self.users_per_call):
            self.client.embed(history)
        return self.users_per_call


class InterestFanOut(Caller):
    """The same GROUP users as single requests sent at once (asyncio), done when all are."""

    users_per_call = GROUP

    def __init__(self, url: str, histories: Sequence[Sequence[Event]], offset: int) -> None:
        self.histories = histories
        self.next = offset
        self.loop = asyncio.new_event_loop()  # one loop per client thread, reused
        self.aclient = AsyncInterestClient(url, retries=0, timeout_s=60)
        self.loop.run_until_complete(self.aclient.model_shape())

    async def _all(self, histories: list[Sequence[Event]]) -> int:
        embeddings = await asyncio.gather(*(self.aclient.embed(h) for h in histories))
        return len(embeddings)

    def __call__(self) -> int:
        return self.loop.run_until_complete(self._all(self.take(self.users_per_call)))

    def close(self) -> None:
        self.loop.run_until_complete(self.aclient.close())
        self.loop.close()


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    clients: int
    caller: type[Caller]
    unit: str  # what one latency sample measures

    @property
    def users_per_call(self) -> int:
        return self.caller.users_per_call


@dataclass(frozen=True)
class Comparison:
    key: str
    question: str
    variants: tuple[Variant, ...]  # the first is the baseline


def _clients(n: int) -> str:
    return f"{n} client" if n == 1 else f"{n} clients"


def comparisons(concurrency: Sequence[int]) -> list[Comparison]:
    top = max(concurrency)
    single = "1 request of 1 user"
    interest = {
        c: Variant(f"user_interest_c{c}", f"user_interest, {_clients(c)}", c, InterestOne, single)
        for c in concurrency
    }
    return [
        Comparison(
            "a_dynamic_batching",
            "(a) server-side dynamic batching: single-user user_interest requests from "
            "1 vs more closed-loop clients",
            tuple(interest[c] for c in concurrency),
        ),
        Comparison(
            "b_client_batching",
            f"(b) client-side batching: one caller needs {GROUP} users' embeddings",
            (
                Variant(
                    f"singles_sequential_{GROUP}",
                    f"{GROUP} single requests, one after another",
                    1,
                    InterestSequential,
                    f"{GROUP} requests of 1 user, in sequence",
                ),
                Variant(
                    f"singles_concurrent_{GROUP}",
                    f"{GROUP} single requests at once (asyncio)",
                    1,
                    InterestFanOut,
                    f"{GROUP} requests of 1 user, concurrent",
                ),
                Variant(
                    f"embed_many_{GROUP}",
                    f"embed_many: 1 request of {GROUP} users",
                    1,
                    InterestMany,
                    f"1 request of {GROUP} users",
                ),
            ),
        ),
        Comparison(
            "c_recommend_vs_interest",
            f"(c) recommend (adds retrieve, top-{K}) vs user_interest, {top} clients",
            (
                interest[top],
                Variant(
                    f"recommend_c{top}", f"recommend, {_clients(top)}", top, RecommendOne, single
                ),
            ),
        ),
    ]


# --- the closed loop ----------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    started: float  # time.perf_counter()
    finished: float
    users: int
    error: str | None


@dataclass
class Measurement:
    variant: Variant
    window_s: float
    calls: list[Call]  # those that finished inside the measurement window
    stages: dict[str, common.ModelStats] = field(default_factory=dict)
    setup_errors: list[str] = field(default_factory=list)
    client_cpu: float = 0.0  # CPU seconds this process used per second of the window

    def summary(self) -> dict[str, Any]:
        ok = np.array([1000 * (c.finished - c.started) for c in self.calls if not c.error])
        users = sum(c.users for c in self.calls if not c.error)
        out: dict[str, Any] = {
            "key": self.variant.key,
            "label": self.variant.label,
            "clients": self.variant.clients,
            "users_per_call": self.variant.users_per_call,
            "latency_of": self.variant.unit,
            "window_s": round(self.window_s, 3),
            "calls": len(self.calls),
            "failed": sum(1 for c in self.calls if c.error) + len(self.setup_errors),
            "users": users,
            "users_per_s": users / self.window_s if self.window_s else 0.0,
            "calls_per_s": ok.size / self.window_s if self.window_s else 0.0,
            "client_cpu_cores": round(self.client_cpu, 3),
        }
        if ok.size:
            out.update(
                p50_ms=float(np.percentile(ok, 50)),
                p90_ms=float(np.percentile(ok, 90)),
                p99_ms=float(np.percentile(ok, 99)),
                mean_ms=float(ok.mean()),
                max_ms=float(ok.max()),
            )
        errors = sorted({c.error for c in self.calls if c.error} | set(self.setup_errors))
        out["errors"] = errors[:5]
        out["stages"] = {
            name: {
                "requests": s.requests,
                "executions": s.executions,
                "avg_batch": round(s.avg_batch, 3),
                "queue_ms": round(s.queue_ms, 3),
                "compute_ms": round(s.compute_ms, 3),
            }
            for name, s in self.stages.items()
        }
        return out


def run_variant(
    variant: Variant,
    url: str,
    histories: Sequence[Sequence[Event]],
    seconds: float,
    settle_s: float,
    max_calls: int,
    stats: Callable[[], dict[str, Any]] | None = None,
    tick: Callable[[float], None] | None = None,
) -> Measurement:
    """`variant.clients` threads in a closed loop; calls finishing inside
    [start + settle_s, start + settle_s + seconds] count. Each client stops after the window
    or after `max_calls` calls, whichever comes first."""
    ready = threading.Barrier(variant.clients + 1)
    stop = threading.Event()
    lock = threading.Lock()
    calls: list[Call] = []
    setup_errors: list[str] = []

    def client(index: int) -> None:
        try:
            caller = variant.caller(url, histories, index * variant.users_per_call)
        except Exception as exc:  # the server refused the connection: recorded
            with lock:
                setup_errors.append(f"setup: {type(exc).__name__}: {exc}")
            ready.wait(timeout=SETUP_TIMEOUT_S)
            return
        try:
            ready.wait(timeout=SETUP_TIMEOUT_S)
            for _ in range(max_calls):
                if stop.is_set():
                    return
                started = time.perf_counter()
                try:
                    users, error = caller(), None
                except Exception as exc:  # every failed call is counted, none retried
                    users, error = 0, f"{type(exc).__name__}: {exc}"
                with lock:
                    calls.append(Call(started, time.perf_counter(), users, error))
        finally:
            caller.close()

    threads = [
        threading.Thread(target=client, args=(i,), daemon=True, name=f"{variant.key}-{i}")
        for i in range(variant.clients)
    ]
    for thread in threads:
        thread.start()
    ready.wait(timeout=SETUP_TIMEOUT_S)  # every client connected: the clock starts now
    start = time.perf_counter()
    lo = start + settle_s
    hi = lo + seconds
    _sleep_until(lo, tick, start)
    before = stats() if stats else {}
    cpu = time.process_time()  # the load generator's own CPU: it shares the machine
    _sleep_until(hi, tick, start)
    cpu = time.process_time() - cpu
    stop.set()
    after = stats() if stats else {}
    for thread in threads:
        thread.join(timeout=120)
    counted = [c for c in calls if lo <= c.finished <= hi]  # completions in the window
    measured = Measurement(variant, hi - lo, counted, setup_errors=setup_errors)
    measured.client_cpu = cpu / (hi - lo)
    if stats:
        measured.stages = common.stage_stats(before, after)
    return measured


def _sleep_until(when: float, tick: Callable[[float], None] | None, start: float) -> None:
    while (left := when - time.perf_counter()) > 0:
        time.sleep(min(0.25, left))
        if tick:
            tick(time.perf_counter() - start)


# --- the run ----------------------------------------------------------------------------


def synthetic_histories() -> list[list[Event]]:
    """Each synthetic user's last 50 events (their images included) as client Events."""
    users = generate(HISTORY_CONFIG).dataset.by_user()
    return [
        [Event(e.time, e.text, e.image, e.labels) for e in events[-50:]]
        for events in users.values()
    ]


def client_build_ms(histories: Sequence[Sequence[Event]], shape: ModelShape) -> dict[str, float]:
    """What building a request costs the client, outside the server's time."""
    out = {}
    for n in (1, GROUP):
        samples = []
        for i in range(40):
            batch = [histories[(i + j) % len(histories)] for j in range(n)]
            started = time.perf_counter()
            embedding_call("user_interest", batch, None, shape)
            samples.append(1000 * (time.perf_counter() - started))
        out[f"{n} user{'s' if n > 1 else ''}"] = round(float(np.median(samples)), 3)
    return out


def repository_note(repository: Path) -> str:
    manifests = [Manifest.load(latest_version(repository / s)) for s in STAGE_SPECS]
    trained = all(m.trained for m in manifests if stages.get(m.stage).learned)
    data = manifests[0].provenance.catalogue or "?"
    state = "trained" if trained else "untrained (seeded initial weights; cost is the same)"
    return f"repository {repository}: catalogue {data}, weights {state}"


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = rows[0]
    for row in rows:
        row["ratios_vs_baseline"] = {
            key: round(row[key] / base[key], 3) if base.get(key) and key in row else None
            for key in ("users_per_s", "p50_ms", "p90_ms", "p99_ms")
        }
    rows[0]["baseline"] = True
    return rows


def render_markdown(result: dict[str, Any], ctx: common.RunContext) -> str:
    s = result["settings"]
    lines = [
        "# dynemb throughput and latency (synthetic histories)",
        "",
        "Closed-loop gRPC clients against a tritonserver started by the benchmark; "
        f"each variant measured for {s['seconds']} s after {s['settle_seconds']} s of "
        f"settling, after {s['warmup_seconds']} s of warm-up. Histories: {s['histories']}. "
        "Ratios are against the first row of each table. Latency percentiles are over "
        "successful calls; what one call is depends on the variant (column *one call*). "
        "*client CPU* is the CPU time the benchmark process itself used per second of "
        "the window (in cores): on a small machine the load generator competes with the "
        "server.",
        "",
        "## Context",
        "",
        common.context_markdown(ctx),
        "",
        "Client-side cost of building a request (inside the measured latencies; median ms): "
        + ", ".join(f"{k} {v}" for k, v in result["client_build_ms"].items()),
    ]
    for comparison in result["comparisons"]:
        lines += [
            "",
            f"## {comparison['question']}",
            "",
            "| variant | clients | one call | calls | failed | users/s | × | p50 ms | p90 ms "
            "| p99 ms | p50 × | p99 × | client CPU |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in comparison["variants"]:
            r = row["ratios_vs_baseline"]
            lines.append(
                f"| {row['label']} | {row['clients']} | {row['latency_of']} | {row['calls']} "
                f"| {row['failed']} | {row['users_per_s']:.1f} | {_x(r['users_per_s'])} "
                f"| {_ms(row, 'p50_ms')} | {_ms(row, 'p90_ms')} | {_ms(row, 'p99_ms')} "
                f"| {_x(r['p50_ms'])} | {_x(r['p99_ms'])} | {row['client_cpu_cores']:.2f} |"
            )
        errors = sorted({e for row in comparison["variants"] for e in row["errors"]})
        lines.extend(f"\nerror: `{e}`" for e in errors)
        if comparison["key"] == "a_dynamic_batching":
            lines += ["", *batching_table(comparison["variants"])]
    lines += [
        "",
        "## Per-stage statistics of every variant",
        "",
        "From `get_inference_statistics` before and after each window: requests = users "
        "(inference_count), executions = batches run (execution_count).",
    ]
    for comparison in result["comparisons"]:
        for row in comparison["variants"]:
            stats = {
                name: common.ModelStats(
                    v["requests"], v["executions"], v["queue_ms"], v["compute_ms"]
                )
                for name, v in row["stages"].items()
            }
            lines += ["", f"**{row['label']}** ({comparison['key']})", ""]
            lines.append(common.stats_markdown(stats))
    return "\n".join(lines) + "\n"


def batching_table(rows: list[dict[str, Any]]) -> list[str]:
    """Average batch per stage (inference_count / execution_count) at each concurrency."""
    header = "| stage | " + " | ".join(_clients(r["clients"]) for r in rows) + " |"
    lines = [
        "Average batch the dynamic batcher formed per stage "
        "(inference_count / execution_count over the window):",
        "",
        header,
        "|---|" + "---:|" * len(rows),
    ]
    for stage in STAGE_SPECS:
        cells = []
        for row in rows:
            s = row["stages"].get(stage)
            cells.append(f"{s['avg_batch']:.2f} ({s['requests']}/{s['executions']})" if s else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return lines


def _span(values: Iterable[int]) -> str:
    values = list(values)
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}-{high}"


def _x(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.2f}×"


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "—"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window per variant")
    parser.add_argument("--warmup-seconds", type=float, default=15.0, help="warm-up, in total")
    parser.add_argument(
        "--settle-seconds", type=float, default=2.0, help="unmeasured start of each variant"
    )
    parser.add_argument(
        "--max-calls", type=int, default=100_000, help="per client and variant (a bound)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repository", type=Path, help="reuse a built repository")
    parser.add_argument(
        "--out", type=Path, default=common.RESULTS / "throughput", help="writes OUT.md, OUT.json"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup_seconds < 0 or args.settle_seconds < 0:
        parser.error("--seconds must be > 0; --warmup-seconds, --settle-seconds >= 0")
    if args.max_calls < 1 or min(args.concurrency) < 1:
        parser.error("--max-calls and every --concurrency must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ctx = common.collect_context()  # the load average before we load the machine
    warning = ctx.load_warning()
    if warning:
        console.print(f"[yellow]WARNING: {warning}[/yellow]")
    histories = synthetic_histories()
    plan = comparisons(sorted(set(args.concurrency)))
    runs = list({v.key: v for c in plan for v in c.variants}.values())  # shared rows once
    total_s = args.warmup_seconds + len(runs) * (args.seconds + args.settle_seconds)
    console.print(f"{len(runs)} variants, about {total_s / 60:.1f} min of load after start-up")

    with tempfile.TemporaryDirectory(prefix="dynemb-bench-") as tmp:
        repository = args.repository
        if repository is None:
            repository = Path(tmp) / "model_repository"
            console.print(f"building the synthetic repository into {repository}")
            build_repository(BuildOptions(repository=repository, catalogue="synthetic"))
        ctx.notes.append(repository_note(repository))
        config = ServerConfig(
            repository=repository,
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            log_file=Path(tmp) / "tritonserver.log",
        )
        console.print(f"starting tritonserver on {config.grpc_url}")
        with TritonServer(config) as server:
            result = measure(args, ctx, config.grpc_url, histories, plan, runs)
            if not server.running():
                raise SystemExit(f"tritonserver died during the run:\n{server.log_tail()}")

    ctx.finish()
    result["context"] = ctx.as_dict()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(render_markdown(result, ctx), encoding="utf-8")
    console.print(f"wrote {md_path} and {json_path}")
    failed = sum(row["failed"] for c in result["comparisons"] for row in c["variants"])
    return 1 if failed else 0


def measure(
    args: argparse.Namespace,
    ctx: common.RunContext,
    url: str,
    histories: list[list[Event]],
    plan: list[Comparison],
    runs: list[Variant],
) -> dict[str, Any]:
    admin = grpcclient.InferenceServerClient(url)
    try:
        ctx.versions["tritonserver"] = admin.get_server_metadata(as_json=True)["version"]
        models = [*STAGE_SPECS, *ENSEMBLE_SPECS]
        ctx.served = common.served_settings(
            {m: admin.get_model_config(m, as_json=True) for m in models}
        )
        with InterestClient(url) as probe:
            shape = probe.model_shape()

        def stats() -> dict[str, Any]:
            return admin.get_inference_statistics(as_json=True)

        measured: dict[str, Measurement] = {}
        warmups = [v for v in runs if v.clients == max(args.concurrency)] + [
            v for v in runs if v.caller is InterestMany
        ]
        with Progress(
            TextColumn("{task.description:<48}"),
            BarColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            for variant in warmups:
                share = args.warmup_seconds / len(warmups)
                task = progress.add_task(f"warm-up: {variant.label}", total=share)
                run_variant(
                    variant,
                    url,
                    histories,
                    share,
                    0.0,
                    args.max_calls,
                    tick=lambda t, task=task: progress.update(task, completed=t),
                )
                progress.update(task, completed=share)
            for variant in runs:
                total = args.settle_seconds + args.seconds
                task = progress.add_task(variant.label, total=total)
                measured[variant.key] = run_variant(
                    variant,
                    url,
                    histories,
                    args.seconds,
                    args.settle_seconds,
                    args.max_calls,
                    stats=stats,
                    tick=lambda t, task=task: progress.update(task, completed=t),
                )
                progress.update(task, completed=total)
    finally:
        admin.close()

    return {
        "benchmark": "throughput",
        "data": common.SYNTHETIC_LABEL,
        "context": ctx.as_dict(),
        "settings": {
            "seconds": args.seconds,
            "settle_seconds": args.settle_seconds,
            "warmup_seconds": args.warmup_seconds,
            "max_calls_per_client": args.max_calls,
            "concurrency": sorted(set(args.concurrency)),
            "top_k": K,
            "histories": (
                f"{len(histories)} synthetic users (seed {HISTORY_CONFIG.seed}), "
                f"the last {_span(len(h) for h in histories)} events of each, images on "
                f"about {1 - HISTORY_CONFIG.image_missing_prob:.0%} of events; "
                f"served window L = {shape.max_events}"
            ),
            "client": "dynemb_client, retries=0 (every failure counted), one channel per client",
        },
        "client_build_ms": client_build_ms(histories, shape),
        "comparisons": [
            {
                "key": c.key,
                "question": c.question,
                "baseline": c.variants[0].key,
                "variants": with_ratios([measured[v.key].summary() for v in c.variants]),
            }
            for c in plan
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
