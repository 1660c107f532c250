"""Locust load test of the served ensembles over gRPC (synthetic histories).

    .venv/bin/locust -f benchmarks/locustfile.py --headless -u 16 -r 8 -t 60s \\
        --host 127.0.0.1:8001 --csv benchmarks/results/locust-mixed InterestUser
    .venv/bin/locust -f benchmarks/locustfile.py --headless -u 16 -r 8 -t 60s \\
        --host 127.0.0.1:8001 --csv benchmarks/results/locust-sessions SessionUser

`SessionUser` streams events into sessions (see its docstring); `InterestUser`:

Each simulated user is a closed-loop gRPC client (no wait between calls) that calls
`recommend` (top-10) and `user_interest` in equal shares, each with a synthetic history of
0 (cold start), 5, 20 or 50 events; the request name carries the length, so Locust's
table shows what a longer history costs. Every call is timed and reported through
`events.request` (failures with their exception); the client does not retry, so a failure
counts. Only a loopback `--host` is accepted. A few calls of each kind warm the server up
before the users start. With `--csv PREFIX` a markdown summary with the run's context and
Triton's per-stage batching statistics is written to PREFIX.md (or to `--summary PATH`).
"""

# gRPC must be patched for gevent before any channel exists, so before tritonclient loads.
from grpc.experimental import gevent as grpc_gevent

grpc_gevent.init_gevent()

import logging  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import tritonclient.grpc as grpcclient  # noqa: E402
from locust import User, constant, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from dynemb.bench import context as common  # noqa: E402
from dynemb.data.synthetic import SyntheticConfig, generate  # noqa: E402
from dynemb.ensembles import MODELS  # noqa: E402
from dynemb_client import Event, InterestClient  # noqa: E402

log = logging.getLogger("benchmarks.locust")

LENGTHS = (0, 5, 20, 50)  # events per history; 0 = cold start, 50 = the full window
K = 10
WARMUP_ROUNDS = 2  # calls per (kind, length) before the users start
HISTORY_CONFIG = SyntheticConfig(
    n_categories=6, items_per_category=20, n_users=32, events_per_user=(50, 80), seed=0
)


def synthetic_histories() -> list[list[Event]]:
    """Each synthetic user's events (images included) as client Events, oldest first."""
    users = generate(HISTORY_CONFIG).dataset.by_user()
    return [[Event(e.time, e.text, e.image, e.labels) for e in evs] for evs in users.values()]


HISTORIES = synthetic_histories()


def history(rng: random.Random, length: int) -> list[Event]:
    return HISTORIES[rng.randrange(len(HISTORIES))][-length:] if length else []


@dataclass
class RunState:
    """What the run records between start and end: context and Triton's statistics."""

    url: str = ""
    context: common.RunContext | None = None
    stats_at_start: dict[str, Any] = field(default_factory=dict)


STATE = RunState()  # one run per Locust process


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    parser.add_argument(
        "--summary",
        type=str,
        default="",
        help="markdown summary with context (default: the --csv prefix + .md)",
    )


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    try:
        STATE.url = common.loopback_target(environment.host)
    except ValueError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from exc  # refuse before any user starts
    STATE.context = common.collect_context()
    warning = STATE.context.load_warning()
    if warning:
        log.warning("%s", warning)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    """Warm-up calls (not in Locust's statistics), then the first statistics snapshot."""
    with InterestClient(STATE.url, retries=3, timeout_s=60) as client:
        rng = random.Random(0)
        for _ in range(WARMUP_ROUNDS):
            for length in LENGTHS:
                client.recommend(history(rng, length), k=K)
                client.embed(history(rng, length))
    admin = grpcclient.InferenceServerClient(STATE.url)
    try:
        ctx = STATE.context
        if ctx is not None:
            ctx.versions["tritonserver"] = admin.get_server_metadata(as_json=True)["version"]
            ctx.served = common.served_settings(
                {m: admin.get_model_config(m, as_json=True) for m in MODELS}
            )
        STATE.stats_at_start = admin.get_inference_statistics(as_json=True)
    finally:
        admin.close()


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    target = getattr(options, "summary", "") or (
        f"{options.csv_prefix}.md" if getattr(options, "csv_prefix", None) else ""
    )
    if not target or STATE.context is None or not STATE.stats_at_start:
        return
    try:
        admin = grpcclient.InferenceServerClient(STATE.url)
        try:
            stage_stats = common.stage_stats(
                STATE.stats_at_start, admin.get_inference_statistics(as_json=True)
            )
        finally:
            admin.close()
    except Exception as exc:  # the server is gone: the summary still has Locust's numbers
        log.warning("no Triton statistics for the summary: %s", exc)
        stage_stats = {}
    STATE.context.finish()
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(summary_markdown(environment, stage_stats), encoding="utf-8")
    log.info("wrote %s", path)


SCENARIOS = {
    "InterestUser": "closed-loop users (no wait between calls), `recommend` (top-{k}) and "
    "`user_interest` in equal shares, histories of {lengths} events (0 = cold start)",
    "SessionUser": "closed-loop users streaming one event per `session` update (8 returning"
    " : 1 new : 1 evicted, see SessionUser), every tenth answer checked against "
    "`user_interest` over the same history (a gap over 1e-4 is a failure)",
}


def scenario(classes: Sequence[str], users: int | None) -> str:
    """What the run's users did, from the user classes it ran: with no class named on the
    command line Locust runs them all, shared among the users, and the summary says so."""
    kinds = [SCENARIOS[name].format(k=K, lengths=", ".join(map(str, LENGTHS))) for name in classes]
    if len(kinds) == 1:
        return f"{users} {kinds[0]}; "
    return (
        f"{users} users shared among {len(kinds)} kinds ({', '.join(classes)}; name one on "
        "the command line to run it alone): " + "; ".join(kinds) + "; "
    )


def summary_markdown(environment: Environment, stage_stats: dict[str, common.ModelStats]) -> str:
    ctx = STATE.context
    assert ctx is not None
    stats = environment.stats
    options = environment.parsed_options
    users = getattr(options, "num_users", None)
    classes = [cls.__name__ for cls in environment.user_classes]
    lines = [
        "# dynemb Locust run over gRPC (synthetic histories)",
        "",
        scenario(classes, users) + "the client does not retry. "
        f"{WARMUP_ROUNDS} warm-up calls per kind and length ran before the users started "
        "and are not counted. Times in ms; Locust rounds response times above 100 ms "
        "to 2 significant digits in its percentiles.",
        "",
        "## Context",
        "",
        common.context_markdown(ctx),
        "",
        "## Requests",
        "",
        "| name | requests | failures | req/s | p50 | p90 | p99 | max | mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    entries = sorted(stats.entries.values(), key=lambda e: (e.name, e.method))
    for e in [*entries, stats.total]:
        if not e.num_requests:
            continue
        lines.append(
            f"| {e.name} | {e.num_requests} | {e.num_failures} | {e.total_rps:.2f} "
            f"| {e.get_response_time_percentile(0.5):.0f} "
            f"| {e.get_response_time_percentile(0.9):.0f} "
            f"| {e.get_response_time_percentile(0.99):.0f} "
            f"| {e.max_response_time:.0f} | {e.avg_response_time:.0f} |"
        )
    for error in list(stats.errors.values())[:5]:
        lines.append(f"\nerror ({error.occurrences}×) {error.name}: `{error.error}`")
    if stage_stats:
        lines += [
            "",
            "## Triton per-model statistics over the run",
            "",
            "requests = users (inference_count), executions = batches run (execution_count); "
            "avg batch = what dynamic batching formed. The first stages also count the "
            "requests that were in flight when Locust stopped its users (never reported).",
            "",
            common.stats_markdown(stage_stats),
        ]
    return "\n".join(lines) + "\n"


class InterestUser(User):
    """One closed-loop gRPC client of the two ensembles."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.client = InterestClient(common.loopback_target(self.host), retries=0, timeout_s=30)

    def on_stop(self) -> None:
        self.client.close()

    def _timed(self, name: str, call: Callable[[], Sequence[Any]]) -> None:
        started = time.perf_counter()
        exception: BaseException | None = None
        try:
            call()
        except Exception as exc:  # reported to Locust as a failure, the run goes on
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=1000 * (time.perf_counter() - started),
            response_length=0,
            exception=exception,
            context={},
        )

    @task
    def recommend(self) -> None:
        length = self.rng.choice(LENGTHS)
        events_ = history(self.rng, length)
        self._timed(f"recommend L={length:02d}", lambda: self.client.recommend(events_, k=K))

    @task
    def user_interest(self) -> None:
        length = self.rng.choice(LENGTHS)
        events_ = history(self.rng, length)
        self._timed(f"user_interest L={length:02d}", lambda: self.client.embed(events_))


class SessionUser(User):
    """Users streaming events into sessions, one event per `update`: mostly returning
    sessions, some new ones, and some evicted (forgotten on the server by another client,
    so the next update finds no state and this client re-sends its kept history). Every
    tenth answer is checked against `user_interest` over the same kept history: one that
    differs by more than 1e-4 is reported as a failure ("wrong answer")."""

    wait_time = constant(0)
    CHECK_EVERY = 10
    TOLERANCE = 1e-4

    def on_start(self) -> None:
        self.rng = random.Random()
        url = common.loopback_target(self.host)
        self.client = InterestClient(url, retries=0, timeout_s=30)
        self.evictor = InterestClient(url, retries=0, timeout_s=30)
        self.prefix = f"locust-{id(self)}-"
        self.sessions: dict[str, tuple[list[Event], int, float]] = {}  # events, next, shift
        self.calls = 0

    def on_stop(self) -> None:
        self.client.close()
        self.evictor.close()

    def _next_event(self, session: str) -> Event:
        events_, k, shift = self.sessions[session]
        base = events_[k % len(events_)]
        # Replayed events keep moving forward in time (laps of the same user's stream).
        lap = (k // len(events_)) * (events_[-1].time - events_[0].time + 3_600)
        self.sessions[session] = (events_, k + 1, shift)
        return Event(base.time + shift + lap, base.text, base.image, base.labels)

    @task(8)
    def returning(self) -> None:
        if not self.sessions:
            return self.new()
        self._update(self.rng.choice(list(self.sessions)))

    @task(1)
    def new(self) -> None:
        session = f"{self.prefix}{len(self.sessions)}"
        self.sessions[session] = (HISTORIES[self.rng.randrange(len(HISTORIES))], 0, 0.0)
        self._update(session, name="session new")

    @task(1)
    def evicted(self) -> None:
        if not self.sessions:
            return self.new()
        session = self.rng.choice(list(self.sessions))
        self.evictor.forget(session)  # the server drops it; this client still keeps it
        self.evictor.sessions.forget(session)
        self._update(session, name="session evicted")

    def _update(self, session: str, name: str = "session returning") -> None:
        event = self._next_event(session)
        self.calls += 1
        check = self.calls % self.CHECK_EVERY == 0
        started = time.perf_counter()
        exception: BaseException | None = None
        try:
            got = self.client.update(session, [event])
        except Exception as exc:
            exception = exc
        elapsed = 1000 * (time.perf_counter() - started)
        if exception is None and check:
            want = self.client.embed(self.client.sessions.get(session))
            gap = float(abs(got - want).max())
            if gap > self.TOLERANCE:
                exception = AssertionError(f"wrong answer: |E_t - recompute| = {gap:.2e}")
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=elapsed,
            response_length=0,
            exception=exception,
            context={},
        )


if __name__ == "__main__":
    sys.exit("run with: .venv/bin/locust -f benchmarks/locustfile.py --host 127.0.0.1:PORT")
