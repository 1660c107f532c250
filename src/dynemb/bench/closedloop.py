"""One closed-loop load generator for every served variant: `concurrency` clients, each
sending its next request as soon as the last one is answered, bounded in time and count.

It runs in one asyncio loop (gRPC's and HTTP's async clients), so the load generator's own
CPU use is the same for every variant it drives. Calls that finish inside the measured
window count; warm-up calls do not.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

MAX_ERRORS_KEPT = 5


@dataclass
class LoadResult:
    concurrency: int
    seconds: float  # the measured window
    calls: int = 0
    failed: int = 0
    users: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


async def closed_loop(
    call: Callable[[int], Awaitable[int]],
    concurrency: int,
    seconds: float,
    warmup_s: float = 2.0,
    max_calls: int = 1_000_000,
) -> LoadResult:
    """Run `call(i)` (which returns how many users it served) from `concurrency` clients;
    every client stops at the window's end or after `max_calls` calls in all."""
    counter = itertools.count()
    started = time.perf_counter()
    window_start = started + warmup_s
    window_end = window_start + seconds
    result = LoadResult(concurrency, seconds)

    async def client() -> None:
        while True:
            i = next(counter)
            now = time.perf_counter()
            if now >= window_end or i >= max_calls:
                return
            t0 = now
            try:
                users = await call(i)
                error = None
            except Exception as exc:  # counted as a failed call, never hidden
                users, error = 0, f"{type(exc).__name__}: {exc}"
            t1 = time.perf_counter()
            # Calls that finish inside the window count, whenever they started: counting
            # only those that also started inside it left one call per client out at each
            # edge, so throughput read low by about latency / window (the slowest variant
            # most).
            if window_start <= t1 <= window_end:
                result.calls += 1
                if error is None:
                    result.users += users
                    result.latencies_ms.append(1000 * (t1 - t0))
                else:
                    result.failed += 1
                    if len(result.errors) < MAX_ERRORS_KEPT:
                        result.errors.append(error[:300])

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return result
