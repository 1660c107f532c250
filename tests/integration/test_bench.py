"""The serving benchmark end to end on a small scale (its quick mode's shape, shorter), and
perf_analyzer against the session's live server."""

from __future__ import annotations

import json
from pathlib import Path

from dynemb.bench import perf
from dynemb.bench.histories import HistorySet, synthetic_with_images
from dynemb.bench.serving import ServingOptions, serving_benchmark
from dynemb.dims import DIMS
from dynemb.paths import cache_dir
from dynemb_client import Event


def test_bench_runs_all_three_variants_and_writes_its_results(built_repository, tmp_path):
    options = ServingOptions(
        built_repository,
        tmp_path / "results",
        cache_dir(),
        stem="smoke",
        quick=True,
        concurrencies=(1, 4),
        seconds=1.5,
        warmup_s=0.5,
        data=("synthetic-images",),
        max_users=24,
        perf_analyzer=False,
        soak_minutes=0.0,
    )
    result = serving_benchmark(options, say=lambda _: None)
    [data] = result.data
    assert [p.concurrency for p in data.triton] == [1, 4] == [p.concurrency for p in data.plain]
    for point in (*data.triton, *data.plain):
        assert point.failed == 0 and point.calls > 0, point
    assert data.inprocess.users_per_s > 0 and data.ratios.served_over_inprocess > 0
    assert set(data.ratios.served_over_fastapi) == {1, 4}
    hits = {key: stats["hit_rate"] for key, stats in data.caches.items()}
    assert hits["text_rnn/text"] > 0.5 and hits["image_cnn/image"] > 0.5, hits
    saved = json.loads((tmp_path / "results" / "smoke.json").read_text())
    assert set(saved["ratios"]) >= {
        "served_over_inprocess",
        "served_over_fastapi",
        "p99_half_saturation_over_p50_single",
    }
    assert (tmp_path / "results" / "smoke.png").stat().st_size > 0
    assert "SYNTHETIC" in (tmp_path / "results" / "smoke.md").read_text()


def test_perf_analyzer_runs_against_the_live_server(live, tmp_path: Path):
    users = [
        [Event(e.time, e.text, None, e.labels) for e in history]  # its JSON takes no images
        for history in synthetic_with_images(8).users
    ]
    histories = HistorySet("t", "test", True, users, [u[-1].time for u in users])
    data = perf.input_data(histories, DIMS, tmp_path / "input.json")
    point = perf.run(
        perf.perf_analyzer_binary(),
        perf.library_dir(tmp_path),
        live.url,
        "user_interest",
        data,
        concurrency=2,
        window_ms=1500,
        stability_percent=100,  # beside the other tests' servers: settle, do not judge
    )
    assert point.users_per_s > 0 and 0 < point.p50_ms <= point.p99_ms
    assert {"preprocess", "text_rnn", "llm_encoder"} <= set(point.stages)
