"""Failover across replicas, measured: 16 callers (each its own InterestClient over every
replica; 4 of them stream session updates) load 3 replicas; one is SIGKILLed, then
started again. Per trial: calls that failed, how long the dead replica still got attempts
(its share moving to the others), how long after it was ready again every caller used it
(rejoin), and whether session answers still equal the stateless recompute.

`dynemb bench-replicas` runs several trials on one cluster (benchmarks/results/replicas.md);
tests/integration/test_replicas.py runs one on the synthetic test repository.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynemb.bench.context import RunContext, collect_context, context_markdown, write_results
from dynemb.cluster import Replicas, free_configs
from dynemb.ensembles import RECOMMEND_STEPS
from dynemb.paths import cache_dir
from dynemb.server import ServerConfig
from dynemb_client import Event, InterestClient
from dynemb_client import contract as wire

# What the loads use, and what a swap checks (both ensembles); not the admin models.
MODELS = (*RECOMMEND_STEPS, wire.USER_INTEREST, wire.RECOMMEND, wire.SESSION)
T0 = 1_700_000_000.0
SYNTHETIC = "SYNTHETIC histories (generated texts and labels, no images)"
MOVE_TARGET_S, REJOIN_TARGET_S = 2.0, 10.0
QUIET_S = 3.0  # the dead replica got no attempt for this long: its share has moved


def stream(seed: int, n: int) -> list[Event]:
    """A SYNTHETIC user's events, oldest first, some sharing a time."""
    rng = random.Random(seed)
    t, out = T0, []
    for _ in range(n):
        t += rng.choice([0, 60, 3_600, 86_400])
        labels = [f"category:c{rng.randrange(6)}", f"rating:{rng.randrange(1, 6)}"]
        out.append(Event(t, f"item {rng.randrange(40)} lamp", None, labels[: rng.randrange(3)]))
    return out


@dataclass
class FailoverLoad:
    """`callers` closed-loop callers, each its own client over `urls`, until `stop`, at
    most `max_calls` each or `max_s` seconds. The first `session_callers` stream one
    new event per call into sessions (a new user every 40 events) and check every tenth
    answer against the stateless recompute; the others embed histories of 1-50 events."""

    urls: list[str]
    callers: int = 16
    session_callers: int = 4
    max_calls: int = 20_000
    max_s: float = 240.0
    # Session users are new to the servers in each load: a later load must not meet an
    # earlier one's sessions (its events would precede theirs, which is bad input).
    tag: str = field(default_factory=lambda: secrets.token_hex(4))
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    checks: list[float] = field(default_factory=list)  # max |session - recompute| per check
    done: list[int] = field(default_factory=list)
    clients: list[InterestClient] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> FailoverLoad:
        self.done = [0] * self.callers
        self.clients = [
            InterestClient(urls=self.urls, retry_deadline_s=60.0) for _ in range(self.callers)
        ]
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.callers)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, i: int) -> None:
        client, events = self.clients[i], stream(i, 60)
        deadline = time.monotonic() + self.max_s
        n = 0
        try:
            while not self.stop.is_set() and n < self.max_calls and time.monotonic() < deadline:
                if i < self.session_callers:
                    user, j = f"{self.tag}-user-{i}-{n // 40}", n % 40
                    embedding = client.update(user, [events[j]])
                    if j % 10 == 9:
                        expected = client.embed(client.sessions.get(user), at=events[j].time)
                        self.checks.append(float(np.abs(embedding - expected).max()))
                else:
                    client.embed(events[: 1 + n % 50], at=T0 + 1e7)
                n += 1
                self.done[i] = n
        except BaseException as exc:  # every failure a caller saw is the result
            self.errors.append(exc)

    def calls(self, url: str) -> list[int]:
        """Attempts each caller sent to `url` so far."""
        return [next(e.calls for e in c.endpoints() if e.url == url) for c in self.clients]

    def healthy_everywhere(self, url: str) -> bool:
        return all(next(e.healthy for e in c.endpoints() if e.url == url) for c in self.clients)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        for client in self.clients:
            client.close()


@dataclass(frozen=True)
class Trial:
    victim: str
    calls: int  # answered calls over the whole trial, all callers
    failed: int  # calls that raised to a caller
    first_errors: list[str]
    moved_s: float  # kill -> the last attempt any caller sent the dead replica
    attempts_after_kill: list[int]  # per caller: attempts on the dead replica after the kill
    rejoin_s: float  # ready again -> every caller has it healthy and sends it calls
    share_before: float  # the victim's share of attempts before the kill
    share_after_rejoin: float  # its share over the second after the rejoin
    session_checks: int
    session_max_diff: float


def _wait(condition: Callable[[], bool], timeout_s: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not in {timeout_s:.0f} s: {what()}")
        time.sleep(0.05)


def failover_trial(cluster: Replicas, victim: int, load: FailoverLoad | None = None) -> Trial:
    """Load the cluster, SIGKILL replica `victim`, start it again; what the callers saw."""
    load = (load or FailoverLoad(cluster.urls)).start()
    url = cluster.urls[victim]
    try:
        _wait(
            lambda: min(load.done) >= 5 or bool(load.errors),
            60,
            lambda: f"every caller got answers (answers per caller: {load.done})",
        )
        if load.errors:
            raise RuntimeError(f"a caller failed before the kill: {load.errors[0]!r}")
        time.sleep(1.0)
        totals = {u: sum(load.calls(u)) for u in cluster.urls}
        share_before = totals[url] / max(1, sum(totals.values()))
        at_kill = load.calls(url)
        cluster.kill(victim)
        killed_at = last_attempt = time.monotonic()
        seen = sum(load.calls(url))
        while time.monotonic() - last_attempt < QUIET_S:
            time.sleep(0.02)
            now = sum(load.calls(url))
            if now != seen:
                seen, last_attempt = now, time.monotonic()
            if time.monotonic() - killed_at > 60:
                raise TimeoutError("callers kept sending to the dead replica for 60 s")
        moved_s = max(0.0, last_attempt - killed_at)
        after_kill = [now - was for now, was in zip(load.calls(url), at_kill, strict=True)]

        cluster.restart(victim)
        ready_at = time.monotonic()
        rejoined = load.calls(url)
        _wait(
            lambda: (
                load.healthy_everywhere(url)
                and all(n > was for n, was in zip(load.calls(url), rejoined, strict=True))
            ),
            60,
            lambda: f"every caller sends to the restarted replica ({load.calls(url)} calls)",
        )
        rejoin_s = time.monotonic() - ready_at
        before = {u: sum(load.calls(u)) for u in cluster.urls}
        time.sleep(1.0)
        grew = {u: sum(load.calls(u)) - before[u] for u in cluster.urls}
        share_after = grew[url] / max(1, sum(grew.values()))
    finally:
        load.finish()
    return Trial(
        victim=url,
        calls=sum(load.done),
        failed=len(load.errors),
        first_errors=[repr(e) for e in load.errors[:3]],
        moved_s=moved_s,
        attempts_after_kill=after_kill,
        rejoin_s=rejoin_s,
        share_before=share_before,
        share_after_rejoin=share_after,
        session_checks=len(load.checks),
        session_max_diff=max(load.checks, default=float("nan")),
    )


@dataclass
class ReplicaBenchOptions:
    repository: Path
    out_dir: Path
    replicas: int = 3
    trials: int = 3
    stem: str = "replicas"


@dataclass(frozen=True)
class ReplicaBenchResult:
    replicas: int
    callers: int
    trials: list[Trial]
    context: RunContext

    @property
    def targets(self) -> list[tuple[str, str, bool]]:
        t = self.trials
        failed = sum(x.failed for x in t)
        moved = max(x.moved_s for x in t)
        rejoin = max(x.rejoin_s for x in t)
        diff = max(x.session_max_diff for x in t)
        calls = sum(x.calls for x in t)
        return [
            ("0 failed calls seen by callers", f"{failed} of {calls}", not failed),
            (
                f"the killed replica's share moves within {MOVE_TARGET_S:.0f} s",
                f"worst {moved:.2f} s over {len(t)} trials",
                moved <= MOVE_TARGET_S,
            ),
            (
                f"it rejoins within {REJOIN_TARGET_S:.0f} s of being ready",
                f"worst {rejoin:.2f} s",
                rejoin <= REJOIN_TARGET_S,
            ),
            ("session answers equal the recompute (1e-4)", f"max diff {diff:.1e}", diff <= 1e-4),
        ]


def bench_replicas(options: ReplicaBenchOptions, say: Callable[[str], None] = print):
    context = collect_context(data=SYNTHETIC)
    if warning := context.load_warning():
        say(f"warning: {warning}")
    base = ServerConfig(repository=options.repository, models=MODELS, startup_timeout_s=300)
    log_dir = cache_dir() / "logs" / "replicas"
    trials = []
    say(f"starting {options.replicas} replicas")
    with Replicas(free_configs(base, options.replicas, log_dir)) as cluster:
        for i in range(options.trials):
            victim = i % options.replicas
            say(f"trial {i + 1}/{options.trials}: kill {cluster.urls[victim]} under load")
            trial = failover_trial(cluster, victim)
            say(
                f"  {trial.failed} failed of {trial.calls}; moved in {trial.moved_s:.2f} s, "
                f"rejoined {trial.rejoin_s:.2f} s after ready"
            )
            trials.append(trial)
    result = ReplicaBenchResult(options.replicas, FailoverLoad([]).callers, trials, context)
    write_results(options.out_dir / options.stem, result, context, markdown(result))
    return result


def markdown(result: ReplicaBenchResult) -> str:
    lines = [
        "# Replicas: failover and rejoin under load",
        "",
        f"{result.replicas} tritonservers on one host (`dynemb.cluster.Replicas`), "
        f"{result.callers} closed-loop callers, each its own `InterestClient(urls=...)` "
        "(4 stream session updates, the others embed histories of 1-50 events; "
        f"{SYNTHETIC}). Each trial SIGKILLs one replica with its stage processes, waits "
        f"until no caller has sent it anything for {QUIET_S:.0f} s, starts it again on its "
        "ports and waits until every caller sends it calls.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(
            f"| {name} | {measured} | {'yes' if ok else '**no**'} |"
            for name, measured, ok in result.targets
        ),
        "",
        "| trial | killed | calls | failed | moved s | attempts on it after the kill, per "
        "caller | rejoin s | its share before / after | session checks, max diff |",
        "|---:|---|---:|---:|---:|---|---:|---|---|",
    ]
    for i, t in enumerate(result.trials, 1):
        lines.append(
            f"| {i} | {t.victim} | {t.calls} | {t.failed} | {t.moved_s:.2f} | "
            f"{' '.join(map(str, t.attempts_after_kill))} | {t.rejoin_s:.2f} | "
            f"{t.share_before:.2f} / {t.share_after_rejoin:.2f} | "
            f"{t.session_checks}, {t.session_max_diff:.1e} |"
        )
    lines += [
        "",
        "Moved: from the kill to the last attempt any caller sent the dead replica (each "
        "caller marks it down at its own first failure there and retries elsewhere at once; "
        "the in-flight calls fail over too). Rejoin: from the restarted replica's readiness "
        "to every caller having it healthy again (each probes a down endpoint every 0.5 s "
        "on a fresh channel) and sending it calls.",
        "",
        "## Context",
        "",
        context_markdown(result.context),
    ]
    return "\n".join(lines) + "\n"
