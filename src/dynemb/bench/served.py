"""Variants B and C of the serving benchmark behind the same closed-loop load: the plain
FastAPI server over HTTP, and the Triton ensembles over gRPC with the project's client.
Both are started here on free loopback ports and stopped here, by their process group."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tritonclient.grpc as grpcclient

from dynemb.bench.closedloop import LoadResult, closed_loop
from dynemb.bench.context import ModelStats, stage_stats
from dynemb.bench.histories import HistorySet
from dynemb.server import LOOPBACK, ServerConfig, TritonServer, free_port
from dynemb_client import AsyncInterestClient

READY_TIMEOUT_S = 300.0


@dataclass
class ServedPoint:
    """One concurrency level of one served variant."""

    load: LoadResult
    stages: dict[str, ModelStats]  # Triton's own per-stage batching and timing (C only)


# --- C: the Triton ensembles -----------------------------------------------------------


@contextlib.contextmanager
def triton(repository: Path, log_dir: Path) -> Iterator[TritonServer]:
    config = ServerConfig(
        repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=log_dir / "tritonserver-bench.log",
        startup_timeout_s=READY_TIMEOUT_S,
    )
    with TritonServer(config) as server:
        yield server


def triton_sweep(
    url: str,
    histories: HistorySet,
    concurrencies: list[int],
    seconds: float,
    warmup_s: float,
    after_each: Callable[[int], None] | None = None,
) -> list[ServedPoint]:
    """C at each concurrency. `after_each(concurrency)` runs right after that point, while
    the server is idle (the perf_analyzer cross-check), so that the two measurements of
    one concurrency are seconds apart, not a whole sweep: this VM's speed drifts by more
    than 15% over minutes."""
    return asyncio.run(_triton_sweep(url, histories, concurrencies, seconds, warmup_s, after_each))


async def _triton_sweep(
    url, histories, concurrencies, seconds, warmup_s, after_each
) -> list[ServedPoint]:
    admin = grpcclient.InferenceServerClient(url)
    async with AsyncInterestClient(url, retries=0, timeout_s=60) as client:
        one, calls = await one_user_calls(client, histories)
        await warm(one, len(calls))
        points = []
        for concurrency in concurrencies:
            before = admin.get_inference_statistics(as_json=True)
            load = await closed_loop(one, concurrency, seconds, warmup_s)
            after = admin.get_inference_statistics(as_json=True)
            points.append(ServedPoint(load, stage_stats(before, after)))
            if after_each is not None:
                await asyncio.to_thread(after_each, concurrency)
    admin.close()
    return points


async def one_user_calls(client: AsyncInterestClient, histories: HistorySet):
    """A closed-loop call that sends user i's prepared request (one user per request), and
    the prepared requests."""
    calls = [
        await client.prepare_embed([user], at=[t])
        for user, t in zip(histories.users, histories.at, strict=True)
    ]

    async def one(i: int) -> int:
        await client.embed_prepared(calls[i % len(calls)])
        return 1

    return one, calls


async def warm(one, n: int, concurrency: int = 8) -> None:
    """One pass over every user: the caches then hold every item, as in variant A."""
    gate = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> None:
        async with gate:
            await one(i)

    await asyncio.gather(*(bounded(i) for i in range(n)))


def cache_metrics(metrics_url: str, settle_s: float = 1.2) -> dict[str, dict[str, float]]:
    """The dynemb_cache_* series from the server's Prometheus endpoint, by model/cache,
    once two reads `settle_s` apart agree (the server idle): each stage publishes once a
    second, so a read right after the load would miss its last second."""
    deadline = time.monotonic() + 10 * settle_s
    last = _cache_series(metrics_url)
    while time.monotonic() < deadline:
        time.sleep(settle_s)
        now = _cache_series(metrics_url)
        if now == last:
            break
        last = now
    return last


def _cache_series(metrics_url: str) -> dict[str, dict[str, float]]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("dynemb_cache_"):
            continue
        name, _, value = line.rpartition(" ")
        metric, _, labels = name.partition("{")
        fields = dict(part.split("=", 1) for part in labels.rstrip("}").split(",") if part)
        key = f"{fields['model'].strip(chr(34))}/{fields['cache'].strip(chr(34))}"
        stat = metric.removeprefix("dynemb_cache_").removesuffix("_total")
        out.setdefault(key, {})[stat] = float(value)
    for stats in out.values():
        looked_up = stats.get("hits", 0) + stats.get("misses", 0)
        stats["hit_rate"] = stats.get("hits", 0) / looked_up if looked_up else 0.0
    return out


# --- B: the plain FastAPI server -------------------------------------------------------


@contextlib.contextmanager
def plain_server(repository: Path, workers: int, log_dir: Path) -> Iterator[str]:
    port = free_port()
    log = (log_dir / "plain-server.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynemb.bench.plain_server",
            "--repository",
            str(repository),
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    url = f"http://{LOOPBACK}:{port}"
    try:
        _wait_http(url + "/health", process, workers)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_http(url: str, process: subprocess.Popen, workers: int) -> None:
    """Ready when every worker answers: poll until `workers` answers in a row succeed."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    ok = 0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the plain server exited with {process.returncode} at start-up")
        try:
            urllib.request.urlopen(url, timeout=5).read()
            ok += 1
            if ok >= 4 * workers:
                return
        except OSError:
            ok = 0
            time.sleep(0.5)
    raise TimeoutError(f"the plain server at {url} was not ready in {READY_TIMEOUT_S:.0f} s")


def plain_sweep(
    url: str, histories: HistorySet, concurrencies: list[int], seconds: float, warmup_s: float
) -> list[ServedPoint]:
    return asyncio.run(_plain_sweep(url, histories, concurrencies, seconds, warmup_s))


def http_body(user, at: float) -> bytes:
    events = [
        {
            "time": e.time,
            "text": e.text,
            "image": base64.b64encode(e.image).decode() if isinstance(e.image, bytes) else None,
            "labels": list(e.labels),
        }
        for e in user
    ]
    return json.dumps({"events": events, "at": at}).encode()


async def _plain_sweep(url, histories, concurrencies, seconds, warmup_s) -> list[ServedPoint]:
    import httpx

    bodies = [http_body(u, t) for u, t in zip(histories.users, histories.at, strict=True)]
    limits = httpx.Limits(max_connections=max(concurrencies), max_keepalive_connections=None)
    headers = {"content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(i: int) -> int:
            response = await client.post("/embed", content=bodies[i % len(bodies)], headers=headers)
            response.raise_for_status()
            if len(response.json()["embedding"]) == 0:
                raise ValueError("empty embedding")
            return 1

        points = []
        for concurrency in concurrencies:
            load = await closed_loop(one, concurrency, seconds, warmup_s)
            points.append(ServedPoint(load, {}))
    return points
