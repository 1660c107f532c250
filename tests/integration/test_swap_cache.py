"""A stage's per-item cache lives and dies with its version: after a hot swap the new
version answers from its own, empty cache, never with features the old version computed."""

from __future__ import annotations

import time
import urllib.request

import numpy as np

from dynemb.swap.candidates import make_candidate
from dynemb.swap.swapper import Swapper
from dynemb_client import InterestClient, build_inputs

from .test_swap import load_histories


def cache_counter(live, stat: str, model: str, version: int, timeout_s: float = 10.0) -> float:
    """The counter once it is above 0, or 0 after `timeout_s` (a stage publishes its
    metrics once a second, from a thread of its own)."""
    url = f"http://127.0.0.1:{live.config.metrics_port}/metrics"
    wanted = (f"dynemb_cache_{stat}_total{{", f'model="{model}"', f'version="{version}"')
    deadline = time.monotonic() + timeout_s
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(wanted[0]) and wanted[1] in line and wanted[2] in line:
                total += float(line.rsplit(" ", 1)[1])
        if total > 0 or time.monotonic() > deadline:
            return total
        time.sleep(0.1)


def test_a_swapped_stage_starts_with_an_empty_cache(live, tmp_path):
    swapper = Swapper(live.repository, live.url, token=live.token)
    histories = load_histories()
    at = [h[-1].time for h in histories]
    stage = "text_rnn"
    with InterestClient(live.url) as client:
        before = client.embed_many(histories, at=at)
        again = client.embed_many(histories, at=at)  # answered from the cache
        np.testing.assert_allclose(again, before, atol=1e-5)
        candidate = make_candidate(live.repository, stage, tmp_path / "c", scale=0.1)
        result = swapper.swap(stage, candidate, accept_drift=True)
        try:
            after = client.embed_many(histories, at=at)
            x = build_inputs(histories, at, 50, 8)
            want = swapper.current_pipeline().embed(x)  # the new version, computed afresh
            assert np.abs(after - want).max() <= 1e-4
            assert np.abs(after - before).max() > 1e-3  # the old features were not reused
            new = result.new_version
            # The new version filled its own cache: it missed before it hit.
            assert cache_counter(live, "misses", stage, new) > 0
        finally:
            swapper.rollback(stage)
        restored = client.embed_many(histories, at=at)
    np.testing.assert_allclose(restored, before, atol=1e-4)
