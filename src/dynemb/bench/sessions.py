"""The streaming benchmark: what one new event costs with sessions (the server advances
the user's stored state) next to a full recompute of the same user's history, in one run,
in-process and served.

Every user's newest L events are split: the first `hold` start the session (not timed),
the rest arrive one at a time. For each arriving event the session variant sends that
event alone (`update`); the recompute variant sends the whole history so far (`embed`,
what a client without sessions does). Past the window, sessions that hold L events get
one more (they re-window: the sequence part is recomputed over the newest L, per-item
work is not). Ratios are events/s over events/s, measured back to back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynemb.bench.closedloop import LoadResult, closed_loop
from dynemb.bench.context import RunContext, collect_context, context_markdown, write_results
from dynemb.bench.histories import HistorySet, movielens, synthetic_with_images
from dynemb.bench.served import triton
from dynemb.paths import cache_dir
from dynemb.pipeline import Pipeline
from dynemb.sessions.engine import SessionEngine
from dynemb_client import AsyncInterestClient, Event, build_inputs

BATCH = 32


@dataclass
class SessionBenchOptions:
    repository: Path
    out_dir: Path
    data: tuple[str, ...] = ("ml-100k", "synthetic-images")
    hold: int = 10  # events that start each session, untimed
    seconds: float = 15.0  # per served point
    warmup_s: float = 3.0
    concurrencies: tuple[int, ...] = (1, 8, 32)
    max_users: int | None = None
    inprocess_users: int = 128  # the in-process comparison's users (both variants)
    quick: bool = False
    stem: str = "sessions"
    cache: Path = field(default_factory=cache_dir)


@dataclass(frozen=True)
class Rate:
    variant: str
    events: int
    seconds: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    failed: int = 0
    concurrency: int | None = None

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


@dataclass
class DataSessions:
    data: str
    description: str
    synthetic: bool
    users: int
    inprocess: list[Rate]
    served: list[Rate]
    ratios: dict[str, float]


@dataclass
class SessionBenchResult:
    context: RunContext
    options: dict
    results: list[DataSessions]


def load(name: str, options: SessionBenchOptions) -> HistorySet:
    if name == "ml-100k":
        return movielens(options.repository, options.cache, options.max_users)
    return synthetic_with_images(options.max_users or 256)


def past_event(events: list[Event]) -> Event:
    """One more event for a full session: the user's oldest item again, a minute later."""
    first = events[0]
    return Event(events[-1].time + 60, first.text, first.image, first.labels)


# --- in-process: one process, one thread, batches of 32 --------------------------------


def inprocess(repository: Path, users: list[list[Event]], hold: int) -> list[Rate]:
    import torch

    torch.set_num_threads(1)
    engine = SessionEngine.from_repository(repository)
    pipeline = Pipeline.from_repository(repository)
    d = engine.dims
    groups = [users[i : i + BATCH] for i in range(0, len(users), BATCH)]

    def one_user(events, at):
        x = build_inputs([events], [at], d.max_events, d.max_labels)
        return {k: v[0] for k, v in x.items()}

    # Warm-up and priming: every item into the caches, every session started at `hold`.
    states = {}
    for g, group in enumerate(groups):
        at = [h[-1].time for h in group]
        pipeline.embed(build_inputs(group, at, d.max_events, d.max_labels))
        starts = [(None, one_user(h[:hold], h[hold - 1].time)) for h in group]
        for u, done in enumerate(engine.advance(starts)):
            states[g, u] = done.state
    full_events, full_s, sess_events, sess_s = 0, 0.0, 0, 0.0
    steps = max(len(h) for h in users) - hold
    for step in range(steps):
        for g, group in enumerate(groups):
            live = [u for u, h in enumerate(group) if hold + step < len(h)]
            if not live:
                continue
            histories = [group[u][: hold + step + 1] for u in live]
            at = [h[-1].time for h in histories]
            x = build_inputs(histories, at, d.max_events, d.max_labels)
            t0 = time.perf_counter()
            pipeline.embed(x)
            full_s += time.perf_counter() - t0
            full_events += len(live)
            batch = [
                (states[g, u], one_user([h[-1]], h[-1].time))
                for u, h in zip(live, histories, strict=True)
            ]
            t0 = time.perf_counter()
            done = engine.advance(batch)
            sess_s += time.perf_counter() - t0
            sess_events += len(live)
            for u, result in zip(live, done, strict=True):
                states[g, u] = result.state
    # Past the window: sessions holding L events get one more each.
    full_sessions = [(k, s) for k, s in states.items() if s.n_events == d.max_events]
    past_events, past_s = 0, 0.0
    for start in range(0, len(full_sessions), BATCH):
        chunk = full_sessions[start : start + BATCH]
        batch = []
        for (g, u), state in chunk:
            extra = past_event(groups[g][u])
            batch.append((state, one_user([extra], extra.time)))
        t0 = time.perf_counter()
        engine.advance(batch)
        past_s += time.perf_counter() - t0
        past_events += len(chunk)
    return [
        Rate("recompute (whole history, optimised pipeline)", full_events, full_s),
        Rate("session update (one event)", sess_events, sess_s),
        Rate("session update past the window (re-window)", past_events, past_s),
    ]


# --- served: closed-loop clients over gRPC ---------------------------------------------


async def served_point(url: str, users, hold: int, concurrency: int, o, mode: str) -> Rate:
    """`mode` "recompute": embed(history so far) per event; "session": update(event)."""
    async with AsyncInterestClient(url) as client:
        prefix = f"{mode}-c{concurrency}-"
        if mode == "session":
            for u, events in enumerate(users):  # start every session (untimed)
                await client.update(f"{prefix}{u}", events[:hold])
        cursors = [hold] * len(users)

        async def call(i: int) -> int:
            u = i % len(users)
            events = users[u]
            if cursors[u] >= len(events):
                return 0  # this user's stream is over
            k = cursors[u]
            cursors[u] += 1
            if mode == "session":
                await client.update(f"{prefix}{u}", [events[k]])
            else:
                await client.embed(events[: k + 1])
            return 1

        result: LoadResult = await closed_loop(call, concurrency, o.seconds, o.warmup_s)
    return Rate(
        mode,
        result.users,
        result.seconds,
        result.percentile(50),
        result.percentile(99),
        result.failed,
        concurrency,
    )


def served(repository: Path, users, options: SessionBenchOptions, say) -> list[Rate]:
    out = []
    with triton(repository, options.cache / "logs") as server:
        url = server.config.grpc_url
        for c in options.concurrencies:
            for mode in ("recompute", "session"):
                rate = asyncio.run(served_point(url, users, options.hold, c, options, mode))
                say(f"  served c={c} {mode}: {rate.events_per_s:.0f} events/s")
                out.append(rate)
    return out


def ratios(inproc: list[Rate], serv: list[Rate]) -> dict[str, float]:
    full, sess, past = (r.events_per_s for r in inproc)
    out = {"inprocess_update_over_recompute": sess / full, "inprocess_past_window": past / full}
    for c in sorted({r.concurrency for r in serv}):
        pair = {r.variant: r.events_per_s for r in serv if r.concurrency == c}
        out[f"served_update_over_recompute_c{c}"] = pair["session"] / pair["recompute"]
    return out


def bench_sessions(
    options: SessionBenchOptions, say: Callable[[str], None] = print
) -> SessionBenchResult:
    context = collect_context(data="see each data set's description")
    if context.busy:
        say(f"WARNING: {context.load_warning()}")
    results = []
    for name in options.data:
        histories = load(name, options)
        say(f"{name}: {histories.description}")
        inproc = inprocess(
            options.repository, histories.users[: options.inprocess_users], options.hold
        )
        for rate in inproc:
            say(f"  in-process {rate.variant}: {rate.events_per_s:.0f} events/s")
        serv = served(options.repository, histories.users, options, say)
        results.append(
            DataSessions(
                name,
                histories.description,
                histories.synthetic,
                len(histories),
                inproc,
                serv,
                ratios(inproc, serv),
            )
        )
    context.finish()
    out = SessionBenchResult(context, {k: str(v) for k, v in asdict(options).items()}, results)
    write(out, options)
    return out


def write(result: SessionBenchResult, options: SessionBenchOptions) -> None:
    stem = options.out_dir / options.stem
    write_results(stem, result, result.context, render_markdown(result, options))


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def render_markdown(result: SessionBenchResult, options: SessionBenchOptions) -> str:
    mode = "QUICK (smoke run, not for the record)" if options.quick else "full"
    lines = [
        "# Sessions: one new event vs a whole-history recompute",
        "",
        f"Mode: {mode}. Each user's first {options.hold} events start its session (untimed);"
        " the rest arrive one at a time. Recompute = the whole history so far through the "
        "optimised pipeline (`user_interest`); session = the new event alone (`session`). "
        f"In-process: one process, one thread, batches of {BATCH}. Served: closed-loop "
        f"asyncio clients, {options.seconds:g} s per point after {options.warmup_s:g} s.",
        "",
    ]
    for r in result.results:
        tag = " (SYNTHETIC)" if r.synthetic else ""
        lines += [f"## {r.data}{tag}", "", r.description, "", "| in-process | events/s |"]
        lines += ["|---|---|"]
        lines += [f"| {x.variant} | {x.events_per_s:.0f} |" for x in r.inprocess]
        lines += ["", "| served | clients | events/s | p50 ms | p99 ms | failed |"]
        lines += ["|---|---|---|---|---|---|"]
        lines += [
            f"| {x.variant} | {x.concurrency} | {x.events_per_s:.0f} | {_ms(x.p50_ms)} | "
            f"{_ms(x.p99_ms)} | {x.failed} |"
            for x in r.served
        ]
        lines += ["", "| ratio | value | target |", "|---|---|---|"]
        for key, value in r.ratios.items():
            target = "≥ 10" if "past" not in key else "(past the window: no target)"
            lines.append(f"| {key} | {value:.2f} | {target} |")
        lines.append("")
    lines += ["## Run context", "", context_markdown(result.context)]
    return "\n".join(lines) + "\n"
