"""Property-based fuzzing of every model (stages, ensembles, session) on the real server,
through the same code as `dynemb bench-faults`: each malformed request is sent at the same
moment as two good ones (the dynamic batcher may merge them); it alone fails, with
INVALID_ARGUMENT naming the tensor it broke, and the good ones get their answers."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from dynemb.bench.faults import fuzz_model, fuzz_targets
from dynemb.ensembles import MODELS

EXAMPLES = 12  # per model here; the benchmark runs 150


@pytest.fixture(scope="module")
def targets(live, pipeline):
    return fuzz_targets(pipeline, live.repository)


@pytest.mark.parametrize("model", MODELS)
def test_a_malformed_request_fails_alone_on_the_live_server(live, targets, model):
    client = grpcclient.InferenceServerClient(live.url)
    counts, kinds, models, other = Counter(), Counter(), Counter(), []
    with ThreadPoolExecutor(3) as pool:
        fuzz_model(model, targets[model], EXAMPLES, client, pool, counts, kinds, models, other)
    assert counts["malformed"] >= min(EXAMPLES, 10), counts
    assert counts["named"] == counts["malformed"], other  # INVALID_ARGUMENT naming the tensor
    assert counts["good_failed"] == 0 and counts["good"] == 2 * counts["malformed"]
    assert live.server.running()
