"""A bounded closed-loop load on `recommend`: N clients, each sending one request after
another until told to stop, a time limit or a request limit, whichever comes first.
Used by the swap tests and the swap benchmark; every call is recorded, with the version
of each stage that answered it. Given several urls (replicas), each client balances over
all of them."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from dynemb_client import Event, InterestClient


@dataclass(frozen=True)
class Call:
    client: int
    started: float  # time.monotonic()
    finished: float
    error: str | None
    ids: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    versions: Mapping[str, int] = field(default_factory=dict)  # stage -> version answering

    @property
    def latency_ms(self) -> float:
        return 1000 * (self.finished - self.started)


@dataclass
class LoadGenerator:
    url: str | Sequence[str]
    histories: list[list[Event]]
    clients: int = 16
    k: int = 10
    max_seconds: float = 600.0
    max_requests_per_client: int = 100_000
    calls: list[Call] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self, index: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        history = self.histories[index % len(self.histories)]
        # No retries: a request that fails must count as failed, not be hidden.
        urls = [self.url] if isinstance(self.url, str) else list(self.url)
        with InterestClient(urls=urls, retries=0, timeout_s=60) as client:
            for _ in range(self.max_requests_per_client):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                started = time.monotonic()
                try:
                    answer = client.recommend_many_versioned([history], k=self.k)
                except Exception as exc:  # recorded as a failed request
                    call = Call(index, started, time.monotonic(), f"{type(exc).__name__}: {exc}")
                else:
                    [items] = answer.value
                    call = Call(
                        index,
                        started,
                        time.monotonic(),
                        None,
                        tuple(i.item_id for i in items),
                        tuple(i.score for i in items),
                        answer.versions,
                    )
                with self._lock:
                    self.calls.append(call)

    def __enter__(self) -> LoadGenerator:
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    @property
    def failed(self) -> list[Call]:
        return [c for c in self.snapshot() if c.error]


def latency_summary(calls: list[Call]) -> dict[str, float]:
    ok = np.array([c.latency_ms for c in calls if not c.error])
    if ok.size == 0:
        return {"requests": len(calls), "failed": len(calls)}
    return {
        "requests": len(calls),
        "failed": sum(1 for c in calls if c.error),
        "p50_ms": float(np.percentile(ok, 50)),
        "p90_ms": float(np.percentile(ok, 90)),
        "p99_ms": float(np.percentile(ok, 99)),
        "max_ms": float(ok.max()),
    }
