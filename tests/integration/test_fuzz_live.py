"""Property-based fuzzing of all nine models on the real server: each malformed request is
sent at the same moment as two good ones (the dynamic batcher may merge them); it alone
fails, with INVALID_ARGUMENT naming the tensor it broke, and the good ones get their
answers. The benchmark (`dynemb bench-faults`) runs the same over a thousand cases."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from dynemb.bench.faults import fuzz_targets, send
from dynemb.bench.fuzz import malformed
from dynemb.ensembles import MODELS

EXAMPLES = 12  # per model here; the benchmark runs more


@pytest.fixture(scope="module")
def targets(live, pipeline):
    return fuzz_targets(pipeline, live.repository)


@pytest.mark.parametrize("model", MODELS)
def test_a_malformed_request_fails_alone_on_the_live_server(live, targets, model):
    target = targets[model]
    client = grpcclient.InferenceServerClient(live.url)
    pool = ThreadPoolExecutor(3)

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def check(data):
        bad = data.draw(malformed(model, target.inputs, target.good[2], target.ranges))
        futures = [
            pool.submit(send, client, model, request)
            for request in (target.good[0], bad.inputs, target.good[1])
        ]
        first, refused, second = (f.result() for f in futures)
        assert isinstance(refused, InferenceServerException), (bad.field, bad.how)
        assert "INVALID_ARGUMENT" in str(refused.status()), (bad.how, refused)
        assert bad.field in refused.message(), (bad.how, refused.message())
        for answer in (first, second):
            assert not isinstance(answer, Exception), (bad.how, answer)
            for output in target.outputs:
                value = answer.as_numpy(output)
                assert value is not None and len(value) == len(
                    target.good[0][target.inputs[0].name]
                )
                if value.dtype.kind == "f":
                    assert np.isfinite(value).all()

    try:
        check()
    finally:
        pool.shutdown()
