"""Sessions under a stream load while everything that drops their state happens: the
store holds 8 users against 18 streaming ones (real evictions, and hits within a user's
burst of updates), each of the five stages is hot swapped, and the server is restarted.
No call fails, and every answer equals the full recompute of the user's history under a
repository state serving around it."""

from __future__ import annotations

import re
import shutil
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest

from dynemb.cluster import free_configs
from dynemb.pipeline import Pipeline
from dynemb.server import ServerConfig, TritonServer
from dynemb.swap.candidates import make_candidate
from dynemb.swap.swapper import Swapper
from dynemb_client import Event, InterestClient, build_inputs
from tests.integration.test_sessions import TOL, stream

FIVE = ("text_rnn", "image_cnn", "label_mlp", "temporal_lstm", "llm_encoder")
HELD = 8  # the session store's max_users here
CALLERS, USERS_EACH, EVENTS = 6, 3, 40  # 18 users in flight, all within the window
BURST = 4  # a user's consecutive updates
# After a swap reports success, the session model may answer from the old version until
# its version check (0.25 s) sees the swap and its engine has loaded the new weights.
GRACE_S = 10.0


@dataclass(frozen=True)
class Answer:
    user: str
    history: tuple[Event, ...]
    embedding: np.ndarray
    started: float
    finished: float


@dataclass
class StreamLoad:
    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CALLERS)
        ]

    def _run(self, caller: int) -> None:
        deadline = time.monotonic() + 600
        with InterestClient(self.url, retry_deadline_s=120) as client:
            generation = 0
            while not self.stop.is_set() and time.monotonic() < deadline:
                seed = 1000 * caller + 10 * generation
                users = {
                    f"s{caller}-{generation}-{k}": stream(seed + k, EVENTS)
                    for k in range(USERS_EACH)
                }
                # Each user's events in bursts of BURST updates (its state held between
                # them: hits), the users in turn (long enough apart to be evicted).
                for first in range(0, EVENTS, BURST):
                    for user, events in users.items():
                        for j in range(first, min(first + BURST, EVENTS)):
                            if self.stop.is_set() or not self._update(client, user, events, j):
                                return
                generation += 1

    def _update(self, client: InterestClient, user: str, events: list[Event], j: int) -> bool:
        started = time.monotonic()
        try:
            got = client.update(user, [events[j]])
        except Exception as exc:  # every failure a caller saw is the result
            with self._lock:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            return False
        answer = Answer(user, tuple(events[: j + 1]), got, started, time.monotonic())
        with self._lock:
            self.answers.append(answer)
        return True

    def __enter__(self) -> StreamLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def count(self) -> int:
        with self._lock:
            return len(self.answers)


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout_s:.0f} s: {what}"
        time.sleep(0.05)


def session_counter(metrics_port: int, stat: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    total = 0.0
    for line in text.decode().splitlines():
        if line.startswith(f"dynemb_session_{stat}_total{{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def small_store(built_repository, tmp_path) -> ServerConfig:
    """A copy of the repository whose session store holds only HELD users."""
    repository = tmp_path / "repository"
    shutil.copytree(built_repository, repository)
    config = repository / "session" / "config.pbtxt"
    text, n = re.subn(
        r'(key: "max_users"\s*value \{\s*string_value: ")\d+(")',
        rf"\g<1>{HELD}\g<2>",
        config.read_text(),
    )
    assert n == 1
    config.write_text(text)
    base = ServerConfig(
        repository=repository, startup_timeout_s=240, control_token="stream-test-token"
    )
    return free_configs(base, 1, tmp_path)[0]


def test_stream_through_evictions_swaps_and_a_restart(small_store, tmp_path) -> None:
    config = small_store
    swapper = Swapper(config.repository, config.grpc_url, token=config.control_token)
    states = [swapper.current_pipeline()]  # the repository's state i serves after swap i
    windows: list[tuple[float, float]] = []  # (started, finished + grace) of each swap
    server = TritonServer(config).start()
    try:
        server.wait_ready()
        with StreamLoad(config.grpc_url) as load:
            wait_for(lambda: load.count() >= 60 or load.errors, 120, "answers before swaps")
            for stage in FIVE:
                candidate = make_candidate(config.repository, stage, tmp_path / stage, scale=0.3)
                started = time.monotonic()
                swapper.swap(stage, candidate, accept_drift=True)
                windows.append((started, time.monotonic() + GRACE_S))
                states.append(swapper.current_pipeline())
                seen = load.count()
                wait_for(lambda n=seen: load.count() >= n + 30 or load.errors, 120, "answers")
            evictions = session_counter(config.metrics_port, "evictions")
            hits = session_counter(config.metrics_port, "hits")
            server.stop()  # every state is gone; the clients ride through on retries
            server = TritonServer(config).start()
            server.wait_ready()
            seen = load.count()
            wait_for(lambda: load.count() >= seen + 60 or load.errors, 180, "after restart")
    finally:
        server.stop()
    assert not load.errors, load.errors[:3]
    assert evictions > 0 and hits > 0  # users dropped to stay within HELD, and held ones
    answers = load.answers
    assert len(answers) > 300
    # Which states may have answered each call: any serving at some point while it ran.
    allowed = []
    for a in answers:
        first = sum(1 for _, end in windows if end < a.started)
        last = sum(1 for start, _ in windows if start < a.finished)
        allowed.append(range(first, last + 1))
    worst = [np.inf] * len(answers)
    for i, pipeline in enumerate(states):
        rows = [n for n, r in enumerate(allowed) if i in r]
        for chunk in range(0, len(rows), 32):
            batch = rows[chunk : chunk + 32]
            want = recompute(pipeline, [answers[n] for n in batch])
            for n, w in zip(batch, want, strict=True):
                worst[n] = min(worst[n], float(np.abs(answers[n].embedding - w).max()))
    print(f"{len(answers)} answers; before the restart {hits:.0f} hits, {evictions:.0f} evictions")
    print(f"max diff from the recompute {max(worst):.1e}")
    bad = [(answers[n].user, len(answers[n].history), d) for n, d in enumerate(worst) if d > TOL]
    assert not bad, (len(bad), bad[:5])


def recompute(pipeline: Pipeline, answers: list[Answer]) -> np.ndarray:
    histories = [list(a.history) for a in answers]
    x = build_inputs(histories, [h[-1].time for h in histories], 50, 8)
    return pipeline.embed(x)
