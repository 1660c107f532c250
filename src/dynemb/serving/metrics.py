"""The per-item caches as Prometheus metrics, through Triton's custom metrics API: served
on the server's metrics port next to Triton's own (`nv_inference_*`).

`dynemb_cache_hits_total`, `_misses_total`, `_evictions_total` (counters) and
`dynemb_cache_entries`, `dynemb_cache_bytes` (gauges), labelled by model, version and
cache (e.g. text_rnn / 1 / text).
"""

from __future__ import annotations

import contextlib
import threading
import traceback
from collections.abc import Callable
from types import ModuleType
from typing import Any

from dynemb.serving.cache import RowCache

COUNTERS = ("hits", "misses", "evictions")
GAUGES = ("entries", "bytes")
DESCRIPTIONS = {
    "hits": "Per-item cache lookups answered from the cache",
    "misses": "Per-item cache lookups that had to compute the row",
    "evictions": "Rows dropped from a per-item cache to stay within its bounds",
    "entries": "Rows held by a per-item cache",
    "bytes": "Approximate memory held by a per-item cache",
}


class Publisher:
    """Calls `publish` every `period_s` from a thread of its own until `stop`: a model's
    metrics are then current within a period, requests or not (published from execute,
    they had waited for the next request). Not from every execute either: each metric
    update is a round trip to the server process, which once per execute cost a quarter
    of a stage's CPU (measured with py-spy). `publish` must be safe beside execute."""

    def __init__(
        self, publish: Callable[[], None], log_error: Callable[[str], None], period_s: float = 1.0
    ) -> None:
        self.period_s = period_s
        self._publish, self._log_error = publish, log_error
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failures = 0
        while not self._stopping.wait(self.period_s):
            try:
                self._publish()
            except Exception:
                failures += 1
                if failures in (1, 10) or failures % 600 == 0:  # not a traceback a second
                    with contextlib.suppress(Exception):  # a stopping stub's logger
                        self._log_error(f"metrics (failure {failures}): {traceback.format_exc()}")

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class CounterIncreases:
    """Counters published by their increase since the last publish (Triton's counters
    only go up), each remembered as it is published: a call that fails later in the same
    publish never makes the next one count it twice."""

    def __init__(self) -> None:
        self._published: dict[Any, float] = {}

    def publish(self, metric: Any, key: Any, value: float) -> None:
        delta = value - self._published.get(key, 0)
        if delta > 0:
            metric.increment(delta)
        self._published[key] = value


class CacheMetrics:
    """Publishes each cache's statistics (counters by their increase) when asked (see
    Publisher for how often)."""

    def __init__(
        self,
        pb_utils: ModuleType,
        model: str,
        version: str,
        caches: dict[str, RowCache],
    ) -> None:
        self.caches = caches
        self._counters = CounterIncreases()
        self._metrics: dict[tuple[str, str], Any] = {}
        if not caches:
            return
        families = {}
        for stat in (*COUNTERS, *GAUGES):
            counter = stat in COUNTERS
            families[stat] = pb_utils.MetricFamily(
                name=f"dynemb_cache_{stat}{'_total' if counter else ''}",
                description=DESCRIPTIONS[stat],
                kind=pb_utils.MetricFamily.COUNTER if counter else pb_utils.MetricFamily.GAUGE,
            )
        self._families = families  # kept alive as long as their metrics
        for cache in caches:
            labels = {"model": model, "version": version, "cache": cache}
            for stat, family in families.items():
                self._metrics[cache, stat] = family.Metric(labels=labels)

    def update(self) -> None:
        for name, cache in self.caches.items():
            stats = cache.stats()
            for stat in COUNTERS:
                key = name, stat
                self._counters.publish(self._metrics[key], key, getattr(stats, stat))
            for stat in GAUGES:
                self._metrics[name, stat].set(getattr(stats, stat))
