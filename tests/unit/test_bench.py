"""The serving benchmark's parts that need no server: the closed loop, perf_analyzer's
output, the ratios, the plain web server (variant B) against the eager pipeline."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from dynemb.bench import perf
from dynemb.bench.closedloop import closed_loop
from dynemb.bench.inprocess import InProcessResult
from dynemb.bench.serving import LoadPoint, ratios

PERF_OUTPUT = """
Request concurrency: 4
  Client:
    Request count: 2721
    Throughput: 188.565 infer/sec
    p50 latency: 20881 usec
    p90 latency: 26461 usec
    p99 latency: 32974 usec
  Server:
    Inference count: 2723

  Composing models:
  label_mlp, version: 1
      Inference count: 2725
      Execution count: 1970
      Successful request count: 2725
      Avg request latency: 2226 usec (overhead 3 usec + queue 524 usec + compute input 24 usec \
+ compute infer 1621 usec + compute output 53 usec)

  llm_encoder, version: 1
      Inference count: 2723
      Execution count: 1780
      Successful request count: 2723
      Avg request latency: 9307 usec (overhead 4 usec + queue 2178 usec + compute input 54 usec \
+ compute infer 6490 usec + compute output 579 usec)

Inferences/Second vs. Client Average Batch Latency
"""


def test_perf_analyzer_output_is_parsed_with_its_composing_models():
    point = perf.parse(PERF_OUTPUT, 4)
    assert (point.users_per_s, point.p50_ms, point.p99_ms) == (188.565, 20.881, 32.974)
    assert set(point.stages) == {"label_mlp", "llm_encoder"}
    llm = point.stages["llm_encoder"]
    assert (llm.inferences, llm.executions, llm.queue_us, llm.compute_infer_us) == (
        2723,
        1780,
        2178,
        6490,
    )
    with pytest.raises(perf.PerfAnalyzerError, match="Throughput"):
        perf.parse("no numbers here", 1)


def test_perf_analyzer_libraries_are_linked_under_the_names_it_needs(tmp_path):
    libs = perf.library_dir(tmp_path)
    for name in perf.NEEDED:
        assert (libs / name).resolve().exists(), name


def test_closed_loop_is_bounded_and_counts_failures():
    calls = []

    async def call(i: int) -> int:
        calls.append(i)
        await asyncio.sleep(0.001)
        if i % 5 == 4:
            raise RuntimeError("bad luck")
        return 2

    result = asyncio.run(closed_loop(call, concurrency=3, seconds=0.3, warmup_s=0.05))
    assert result.calls > 10 and result.failed > 0
    assert result.users == 2 * (result.calls - result.failed)
    assert result.errors and "bad luck" in result.errors[0]
    assert len(result.latencies_ms) == result.calls - result.failed
    started = time.perf_counter()
    capped = asyncio.run(closed_loop(call, 4, seconds=30.0, warmup_s=0.0, max_calls=7))
    assert capped.calls == 7 and time.perf_counter() - started < 5  # stopped by the count


def test_closed_loop_counts_every_call_that_finishes_in_the_window(monkeypatch):
    """Throughput is completions inside the window over the window, whenever a call
    started: on a clock where each call takes 1 s, a 10 s window after 2.5 s of warm-up
    holds the 10 completions at 3 .. 12 s (counting only calls that also started inside
    it read 9, low by a call per edge)."""
    import dynemb.bench.closedloop as module

    clock = [0.0]
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock[0])

    async def call(i: int) -> int:
        clock[0] += 1.0
        await asyncio.sleep(0)
        return 1

    result = asyncio.run(closed_loop(call, concurrency=1, seconds=10.0, warmup_s=2.5))
    assert result.calls == 10 and result.users_per_s == 1.0


def _point(concurrency: int, users_per_s: float, p50: float, p99: float) -> LoadPoint:
    return LoadPoint(concurrency, 100, 0, users_per_s, p50, p50, p99)


def test_ratios_are_the_ones_the_issue_defines():
    a = InProcessResult(
        processes=2, batch=32, seconds=10, users=5000, batch_p50_ms=1, batch_p99_ms=1
    )
    c = [_point(1, 100, 8.0, 10), _point(4, 260, 15, 22), _point(16, 400, 40, 70)]
    b = [_point(1, 50, 16, 20), _point(4, 100, 40, 60), _point(16, 100, 160, 400)]
    q = ratios(a, b, c)
    assert q.served_over_inprocess == pytest.approx(400 / 500)
    assert q.served_over_fastapi == {1: 2.0, 4: 2.6, 16: 4.0}
    assert q.served_over_fastapi_min_at_16_plus == 4.0
    # Half of C's saturation (200 users/s) is first reached at 4 clients: its p99 / p50(1).
    assert q.half_saturation_concurrency == 4
    assert q.p99_half_saturation_over_p50_single == pytest.approx(22 / 8.0)


def test_plain_server_answers_what_the_eager_pipeline_computes(repo, monkeypatch, png):
    from fastapi.testclient import TestClient

    from dynemb.bench import plain_server
    from dynemb.bench.histories import HistorySet
    from dynemb.bench.served import http_body
    from dynemb.dims import DIMS
    from dynemb.pipeline import Pipeline, eager_uncached
    from dynemb_client import Event, build_inputs

    monkeypatch.setenv(plain_server.REPOSITORY_ENV, str(repo))
    user = [
        Event(1.7e9 + 60 * i, f"lamp {i}", png if i % 2 else None, ["category:c1"])
        for i in range(9)
    ]
    history = HistorySet("t", "test", True, [user], [user[-1].time])
    with TestClient(plain_server.create_app()) as client:
        assert client.get("/health").json() == {"ok": True}
        json_body = {"content-type": "application/json"}
        answer = client.post("/embed", content=http_body(user, history.at[0]), headers=json_body)
        assert answer.status_code == 200
        bad = client.post(
            "/embed", content=b'{"events": [{"time": -5}], "at": null}', headers=json_body
        )
        assert bad.status_code == 422 and "EVENT_TIME" in bad.text
    x = build_inputs([user], [history.at[0]], DIMS.max_events, DIMS.max_labels)
    want = Pipeline.from_repository(repo, eager_uncached()).embed(x)[0]
    np.testing.assert_allclose(answer.json()["embedding"], want, atol=1e-5)
