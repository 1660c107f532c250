"""The streaming benchmark: what one new event costs with sessions (the server advances
the user's stored state) next to a recompute of the same user's window, in one run,
in-process and served.

Each user is one stream of L + S events (the users with that many). The first `hold`
start the session (untimed); the rest arrive one at a time, in two phases reported apart:

- within the window (events hold+1 .. L): the recompute sends the whole history so far;
- past the window: the recompute sends the newest L events (a full L-event recompute);
  the session holds its window (dynemb.sessions.state.window_after): it re-windows once
  every B events and steps in between, and the cost of those re-windows is in its
  numbers. Users of a live stream are at every point of that cycle, so the users here
  are too: user u's session starts from its first L + (u mod B) events (untimed) and
  streams the next S - B + 1 (`phase_plans`). Started alike, every session would
  re-window at the same event: a batch of 32 re-windows together (1.7 ms a user here)
  where in a stream one re-window shares a batch with steps (4.3 ms alone), and a served
  point that reaches its first 12 events would meet one re-window in 12, not in B.
  Within the window a step's cost hardly depends on where users stand (a batch pads the
  stored keys and values to the longest: 0.32 ms an event spread, 0.28-0.32 aligned), so
  that phase starts every session from `hold`.

"Compute per event" is CPU time: in-process, this process's (time.process_time: one
thread does the work, and what another process takes of the core is not counted), and
events/s is its inverse; served, it is the CPU time of tritonserver and its stage processes
(the load generator's own is reported apart), read from /proc around each point. Ratios
are recompute over session, measured back to back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dynemb.bench.context import RunContext, collect_context, context_markdown, write_results
from dynemb.bench.histories import HistorySet, movielens, synthetic_with_images
from dynemb.bench.served import triton
from dynemb.dims import DIMS, Dims
from dynemb.errors import UsageError
from dynemb.paths import cache_dir
from dynemb.pipeline import Pipeline
from dynemb.processes import tree_cpu_seconds
from dynemb.sessions.engine import Advanced, SessionEngine, session_options
from dynemb.sessions.state import SessionState
from dynemb_client import AsyncInterestClient, Event, build_inputs

BATCH = 32
WITHIN, PAST = "within the window", "past the window"
RECOMPUTE, SESSION = "recompute", "session"
TARGET = 10.0  # issue 12: compute per new event >= 10x lower than a recompute


@dataclass
class SessionBenchOptions:
    repository: Path
    out_dir: Path
    data: tuple[str, ...] = ("ml-100k", "synthetic-images")
    hold: int = 10  # events that start each session, untimed
    past: int = 50  # events streamed past the window (S)
    concurrencies: tuple[int, ...] = (1, 8, 32)
    # Stream consumers batch events: `update_many` of this many users a call vs
    # `embed_many` of their windows, at these concurrencies.
    batch_users: int = 32
    batch_concurrencies: tuple[int, ...] = (1, 4)
    max_seconds: float = 20.0  # per served point: it stops earlier when its streams end
    warmup_calls: int = 16
    max_users: int | None = None
    inprocess_users: int = 128  # the in-process comparison's users (both variants)
    served_users: int = 256
    quick: bool = False
    stem: str = "sessions"
    cache: Path = field(default_factory=cache_dir)


@dataclass(frozen=True)
class Rate:
    variant: str  # RECOMPUTE or SESSION
    events: int
    seconds: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    failed: int = 0
    concurrency: int | None = None  # None: in-process
    users_per_call: int = 1
    server_cpu_s: float | None = None  # tritonserver and its stage processes
    client_cpu_s: float | None = None  # the load generator
    steps: int | None = None  # served: each user's first `steps` events of the phase sent

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    @property
    def cpu_ms_per_event(self) -> float | None:
        """Server CPU per event served; in-process, this process's CPU time per event."""
        cpu = self.seconds if self.concurrency is None else self.server_cpu_s
        return None if cpu is None or not self.events else 1e3 * cpu / self.events


@dataclass
class PhaseResult:
    phase: str  # WITHIN or PAST
    recompute: str  # what the recompute sends
    inprocess: list[Rate]
    served: list[Rate]
    ratios: dict[str, float]  # recompute / session: compute per event, events/s


@dataclass
class DataSessions:
    data: str
    description: str
    synthetic: bool
    users: int
    phases: list[PhaseResult]


@dataclass
class SessionBenchResult:
    context: RunContext
    options: dict
    rewindow_block: int
    results: list[DataSessions]


def load(name: str, options: SessionBenchOptions) -> HistorySet:
    length = DIMS.max_events + options.past
    if name == "ml-100k":
        return movielens(options.repository, options.cache, options.max_users, events=length)
    return synthetic_with_images(options.max_users or 256, events=length)


def recompute_window(events: list[Event], k: int) -> list[Event]:
    """What a client without sessions sends for event k: the newest L events up to it."""
    return events[max(0, k + 1 - DIMS.max_events) : k + 1]


@dataclass(frozen=True)
class PhasePlan:
    """Which of each user's events a phase streams: user u's session starts from its
    first `starts[u]` events (untimed), then gets events starts[u] .. starts[u] + steps - 1
    one at a time."""

    phase: str
    starts: tuple[int, ...]
    steps: int

    def event(self, u: int, j: int) -> int:
        return self.starts[u] + j


def check_hold(hold: int) -> None:
    """A session starts from 1 to L - 1 events (it must have one left to stream)."""
    if not 0 < hold < DIMS.max_events:
        raise UsageError(f"hold must be 1..{DIMS.max_events - 1}, got {hold}")


def phase_plans(users: int, length: int, hold: int, block: int) -> dict[str, PhasePlan]:
    """Within the window every session starts from `hold` events and streams to L. Past
    it, user u's starts from L + (u mod B) events, so that the users are spread evenly over
    the re-window cycle (see the module's note), and each streams the same number of
    events, S - B + 1 (S = length - L), at least one full cycle."""
    L = DIMS.max_events  # noqa: N806
    past = length - L
    check_hold(hold)
    if past < block:
        raise ValueError(f"{past} events past the window: at least B = {block} are needed")
    return {
        WITHIN: PhasePlan(WITHIN, (hold,) * users, L - hold),
        PAST: PhasePlan(PAST, tuple(L + u % block for u in range(users)), past - block + 1),
    }


# --- in-process: one process, one thread, batches of 32 --------------------------------


def inprocess(
    repository: Path, users: list[list[Event]], plans: dict[str, PhasePlan]
) -> dict[str, dict[str, Rate]]:
    """Phase -> variant -> Rate: every user's events of the phase, one a step, in batches
    of users."""
    import torch

    torch.set_num_threads(1)
    engine = SessionEngine.from_repository(repository)
    pipeline = Pipeline.from_repository(repository)
    d = engine.dims
    groups = [range(i, min(i + BATCH, len(users))) for i in range(0, len(users), BATCH)]

    # Warm-up and priming: the same items (each stream's newest L events, the past phase's)
    # into both variants' per-item caches, each through its own path; the session's
    # through sessions of their own, then dropped. Within the window both meet an item
    # first when its event arrives.
    for group in groups:
        newest = [recompute_window(users[u], len(users[u]) - 1) for u in group]
        pipeline.embed(
            build_inputs(newest, [w[-1].time for w in newest], d.max_events, d.max_labels)
        )
        engine.advance([(None, one_user(w, d)) for w in newest])
    out = {}
    for phase, plan in plans.items():
        states = {u: started(engine, users[u][: plan.starts[u]]) for u in range(len(users))}
        spent = {v: [0, 0.0] for v in (RECOMPUTE, SESSION)}
        for j in range(plan.steps):
            for group in groups:
                ks = {u: plan.event(u, j) for u in group}
                windows = [recompute_window(users[u], ks[u]) for u in group]
                x = build_inputs(windows, [w[-1].time for w in windows], d.max_events, d.max_labels)
                t0 = time.process_time()  # CPU time: another process's use is not counted
                pipeline.embed(x)
                spent[RECOMPUTE][1] += time.process_time() - t0
                batch = [(states[u], one_user([users[u][ks[u]]], d)) for u in group]
                t0 = time.process_time()
                done = engine.advance(batch)
                spent[SESSION][1] += time.process_time() - t0
                for u, result in zip(group, done, strict=True):
                    states[u] = state_of(result)
                spent[RECOMPUTE][0] += len(group)
                spent[SESSION][0] += len(group)
        out[phase] = {v: Rate(v, *spent[v]) for v in (RECOMPUTE, SESSION)}
    return out


def started(engine: SessionEngine, events: list[Event]) -> SessionState:
    """A session started from `events`, sent as updates of at most L (as the client
    sends a longer history)."""
    state, L = None, engine.dims.max_events  # noqa: N806
    for i in range(0, len(events), L):
        (done,) = engine.advance([(state, one_user(events[i : i + L], engine.dims))])
        state = state_of(done)
    return state


def one_user(events: list[Event], dims: Dims) -> dict[str, np.ndarray]:
    """One user's wire tensors (no batch axis) for `events`, queried at the newest."""
    x = build_inputs([events], [events[-1].time], dims.max_events, dims.max_labels)
    return {k: v[0] for k, v in x.items()}


def state_of(result: Advanced | Exception) -> SessionState:
    if isinstance(result, Exception):  # the benchmark's own histories: a bug, not load
        raise result
    return result.state


# --- served: closed-loop clients over gRPC ---------------------------------------------


async def served_point(
    url: str,
    server_pid: int,
    users: list[list[Event]],
    plan: PhasePlan,
    steps: int,
    concurrency: int,
    mode: str,
    options: SessionBenchOptions,
    per_call: int = 1,
) -> Rate:
    """The first `steps` events of the phase `plan` of every user, by `concurrency`
    workers that each own a share of the users (a user's events go in order, one at a
    time): one user's event a call (`update` / `embed`), or `per_call` users' a call
    (`update_many` / `embed_many`). Sessions are started from plan.starts (untimed).
    Stops when the streams end or at max_seconds; the Rate says how far they got
    (`steps`)."""
    tag = f"{mode}-{plan.phase[:6]}-c{concurrency}x{per_call}-{time.monotonic_ns()}-"
    groups = [range(i, min(i + per_call, len(users))) for i in range(0, len(users), per_call)]
    async with AsyncInterestClient(url) as client:

        async def send(group: range, j: int) -> None:
            ks = {u: plan.event(u, j) for u in group}
            if per_call == 1 and mode == SESSION:
                await client.update(f"{tag}{group[0]}", [users[group[0]][ks[group[0]]]])
            elif per_call == 1:
                await client.embed(recompute_window(users[group[0]], ks[group[0]]))
            elif mode == SESSION:
                await client.update_many({f"{tag}{u}": [users[u][k]] for u, k in ks.items()})
            else:
                await client.embed_many([recompute_window(users[u], k) for u, k in ks.items()])

        if mode == SESSION:
            await asyncio.gather(
                *(client.update(f"{tag}{u}", users[u][: plan.starts[u]]) for u in range(len(users)))
            )
        for i in range(options.warmup_calls):  # warm-up on sessions of their own
            u = i % len(users)
            if mode == SESSION:
                await client.update(f"warm-{tag}{i}", users[u][: plan.event(u, 0) + 1])
            else:
                await client.embed(recompute_window(users[u], plan.event(u, 0)))
        latencies: list[float] = []
        failed, reached = 0, 0
        deadline = time.perf_counter() + options.max_seconds

        async def worker(w: int) -> int:
            nonlocal failed, reached
            done = 0
            for j in range(steps):
                for group in groups[w::concurrency]:
                    if time.perf_counter() >= deadline:
                        return done
                    reached = max(reached, j + 1)
                    t0 = time.perf_counter()
                    try:
                        await send(group, j)
                    except Exception:
                        failed += 1
                        continue
                    latencies.append(1e3 * (time.perf_counter() - t0))
                    done += len(group)
            return done

        cpu0, mine0, t0 = tree_cpu_seconds(server_pid), time.process_time(), time.perf_counter()
        events = sum(await asyncio.gather(*(worker(w) for w in range(concurrency))))
        seconds = time.perf_counter() - t0
        cpu1, mine1 = tree_cpu_seconds(server_pid), time.process_time()
    lat = np.array(latencies) if latencies else None
    return Rate(
        mode,
        events,
        seconds,
        None if lat is None else float(np.percentile(lat, 50)),
        None if lat is None else float(np.percentile(lat, 99)),
        failed,
        concurrency,
        per_call,
        cpu1 - cpu0,
        mine1 - mine0,
        reached,
    )


def served(
    repository: Path,
    users: list[list[Event]],
    plans: dict[str, PhasePlan],
    options: SessionBenchOptions,
    say,
) -> dict[str, list[Rate]]:
    out: dict[str, list[Rate]] = {phase: [] for phase in plans}
    points = [(c, 1) for c in options.concurrencies]
    points += [(c, options.batch_users) for c in options.batch_concurrencies]
    with triton(repository, options.cache / "logs") as server:
        url, pid = server.config.grpc_url, server.process.pid
        for phase, plan in plans.items():
            for c, per_call in points:
                steps = plan.steps
                for mode in (RECOMPUTE, SESSION):
                    rate = asyncio.run(
                        served_point(url, pid, users, plan, steps, c, mode, options, per_call)
                    )
                    # The session gets the events the recompute reached before its time
                    # was up: within the window a later event costs the recompute more.
                    if rate.steps:
                        steps = rate.steps
                    say(
                        f"  served {phase} c={c} x{per_call} {mode}: "
                        f"{rate.events_per_s:.0f} events/s, "
                        f"server {rate.cpu_ms_per_event:.2f} ms CPU/event"
                    )
                    out[phase].append(rate)
    return out


def ratios(inproc: dict[str, Rate], serv: list[Rate]) -> dict[str, float]:
    """Recompute over session: compute per event (the target's measure) and events/s."""
    full, sess = inproc[RECOMPUTE], inproc[SESSION]
    out = {"inprocess_compute": full.cpu_ms_per_event / sess.cpu_ms_per_event}
    points = sorted({(r.users_per_call, r.concurrency) for r in serv})
    for per_call, c in points:
        pair = {r.variant: r for r in serv if (r.users_per_call, r.concurrency) == (per_call, c)}
        full, sess = pair[RECOMPUTE], pair[SESSION]
        point = _point(sess)
        if full.cpu_ms_per_event and sess.cpu_ms_per_event:
            out[f"served_server_compute_{point}"] = full.cpu_ms_per_event / sess.cpu_ms_per_event
        if full.events_per_s:
            out[f"served_events_per_s_{point}"] = sess.events_per_s / full.events_per_s
    return out


def against_full_window(within: PhaseResult, past: PhaseResult) -> dict[str, float]:
    """Within the window, the issue's own measure: a session update against a full
    L-event recompute (the past phase's recompute, same run), where the phase's ratios
    compare it with the shorter history so far."""
    out = {}
    pairs = [(within.inprocess, past.inprocess, "inprocess")]
    pairs += [([s], [f], _point(s)) for s in within.served for f in past.served if _same(s, f)]
    for sessions, recomputes, label in pairs:
        sess = next(r for r in sessions if r.variant == SESSION)
        full = next(r for r in recomputes if r.variant == RECOMPUTE)
        if sess.cpu_ms_per_event and full.cpu_ms_per_event:
            key = (
                f"{label}_compute_vs_full_l"
                if label == "inprocess"
                else f"served_server_compute_vs_full_l_{label}"
            )
            out[key] = full.cpu_ms_per_event / sess.cpu_ms_per_event
    return out


def _point(rate: Rate) -> str:
    return (
        f"c{rate.concurrency}"
        if rate.users_per_call == 1
        else f"c{rate.concurrency}x{rate.users_per_call}"
    )


def _same(session: Rate, recompute: Rate) -> bool:
    """A session point of one phase and the recompute point of the other at its load."""
    return (
        session.variant == SESSION
        and recompute.variant == RECOMPUTE
        and (session.concurrency, session.users_per_call)
        == (recompute.concurrency, recompute.users_per_call)
    )


def bench_sessions(
    options: SessionBenchOptions, say: Callable[[str], None] = print
) -> SessionBenchResult:
    context = collect_context(data="see each data set's description")
    if context.busy:
        say(f"WARNING: {context.load_warning()}")
    block = session_options(options.repository).rewindow_block
    results = []
    for name in options.data:
        histories = load(name, options)
        say(f"{name}: {histories.description}")
        users = histories.users[: options.inprocess_users]
        plans = phase_plans(len(users), len(users[0]), options.hold, block)
        inproc = inprocess(options.repository, users, plans)
        for phase, rates in inproc.items():
            for rate in rates.values():
                say(f"  in-process {phase} {rate.variant}: {rate.events_per_s:.0f} events/s")
        users = histories.users[: options.served_users]
        plans = phase_plans(len(users), len(users[0]), options.hold, block)
        serv = served(options.repository, users, plans, options, say)
        phases = [
            PhaseResult(
                phase,
                "the whole history so far"
                if phase == WITHIN
                else f"the newest {DIMS.max_events} events",
                list(inproc[phase].values()),
                serv[phase],
                ratios(inproc[phase], serv[phase]),
            )
            for phase in (WITHIN, PAST)
        ]
        phases[0].ratios.update(against_full_window(phases[0], phases[1]))
        results.append(
            DataSessions(name, histories.description, histories.synthetic, len(histories), phases)
        )
    context.finish()
    options_record = {k: str(v) for k, v in asdict(options).items()}
    out = SessionBenchResult(context, options_record, block, results)
    write(out, options)
    return out


def write(result: SessionBenchResult, options: SessionBenchOptions) -> None:
    stem = options.out_dir / options.stem
    write_results(stem, result, result.context, render_markdown(result, options))


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def ratio_target(phase: str, key: str, value: float) -> str:
    """What a ratio of the table is held to, and whether it holds: judged on the exact
    value (9.998 misses 10, though it rounds to 10.00)."""
    if "compute" not in key:
        return "(throughput, no target)"
    if phase == PAST or "full_l" in key:
        met = "met" if value >= TARGET else "**missed**"
        return f"≥ {TARGET:g} (against a full L-event recompute): {met}"
    return "(against the history so far, shorter than L)"


def render_markdown(result: SessionBenchResult, options: SessionBenchOptions) -> str:
    mode = "QUICK (smoke run, not for the record)" if options.quick else "full"
    L = DIMS.max_events  # noqa: N806
    lines = [
        "# Sessions: one new event vs a recompute",
        "",
        f"Mode: {mode}. Each user has L + {options.past} events. Within the window its "
        f"session starts from the first {options.hold} (untimed) and the rest arrive one at a "
        "time; the recompute sends the whole history so far. Past the window the recompute "
        f"sends the newest L = {L} events (a full L-event recompute), while the session "
        f"re-windows once every B = {result.rewindow_block} events (the `session` config's "
        "`rewindow_block`) and steps in between; user u's session starts from its first "
        f"L + (u mod B) events (untimed) and gets the next {options.past} - B + 1 one at a "
        "time, so that the users are spread over the re-window cycle as a live stream's "
        "are, and re-windows share batches with steps. In-process: one process, one thread, "
        f"batches of {BATCH}; compute "
        "per event = this process's CPU time. Served: closed-loop asyncio clients over gRPC, each "
        "owning a share of the users, one user's event a call (`update` / `embed`) or "
        f"{options.batch_users} users' a call (`update_many` / `embed_many`, as a stream "
        "consumer batches events); compute per event = CPU time of tritonserver and its "
        "stage processes (the load generator's own is listed apart). A served point stops "
        "after max_seconds; the session then gets the events the recompute reached.",
        "",
    ]
    for r in result.results:
        tag = " (SYNTHETIC)" if r.synthetic else ""
        lines += [f"## {r.data}{tag}", "", r.description, ""]
        for p in r.phases:
            lines += [f"### {p.phase} (recompute: {p.recompute})", ""]
            lines += [
                "| variant | where | events | events/s | compute ms/event | p50 ms | "
                "p99 ms | client CPU ms/event | failed |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for x in [*p.inprocess, *p.served]:
                where = (
                    "in-process"
                    if x.concurrency is None
                    else f"served, {_plural(x.concurrency, 'client')} x "
                    f"{_plural(x.users_per_call, 'user')} a call"
                )
                client = (
                    "–"
                    if x.client_cpu_s is None or not x.events
                    else f"{1e3 * x.client_cpu_s / x.events:.2f}"
                )
                lines.append(
                    f"| {x.variant} | {where} | {x.events} | {x.events_per_s:.0f} | "
                    f"{_ms(x.cpu_ms_per_event)} | {_ms(x.p50_ms)} | {_ms(x.p99_ms)} | {client} | "
                    f"{x.failed} |"
                )
            lines += ["", "| recompute / session | value | target |", "|---|---|---|"]
            for key, value in p.ratios.items():
                lines.append(f"| {key} | {value:.3f} | {ratio_target(p.phase, key, value)} |")
            lines.append("")
    lines += ["## Run context", "", context_markdown(result.context)]
    return "\n".join(lines) + "\n"
