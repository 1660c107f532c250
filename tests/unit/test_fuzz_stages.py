"""Property-based fuzzing of every stage model through its model.py (fake backend): a
malformed request, batched between two good ones, fails alone with INVALID_ARG naming the
tensor it broke; its neighbours get exactly the answer they get alone."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynemb import stages
from dynemb.bench.faults import fuzz_targets
from dynemb.bench.fuzz import malformed
from dynemb.pipeline import Pipeline

from . import fake_pb_utils
from .test_adapter import load_model

EXAMPLES = 150  # per stage: seven stages, over a thousand malformed requests in all


@pytest.fixture(scope="module")
def targets(repo):
    return fuzz_targets(Pipeline.from_repository(repo), repo)


@pytest.mark.parametrize("name", stages.NAMES)
def test_a_malformed_request_fails_alone_and_names_its_tensor(name, repo, targets):
    model, target = load_model(repo, name), targets[name]
    good = target.good
    alone = [model.execute([fake_pb_utils.InferenceRequest(r)])[0] for r in good[:2]]
    assert not any(a.has_error() for a in alone)
    seen: set[tuple[str, str]] = set()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=True,
    )
    @given(st.data())
    def check(data):
        bad = data.draw(malformed(name, target.inputs, good[2], target.ranges))
        seen.add((bad.field, bad.how))
        out = model.execute(
            [fake_pb_utils.InferenceRequest(x) for x in (good[0], bad.inputs, good[1])]
        )
        assert [r.has_error() for r in out] == [False, True, False], (bad.field, bad.how)
        error = out[1].error
        assert error.code() == fake_pb_utils.TritonError.INVALID_ARG, (bad.how, error.message())
        assert bad.field in error.message(), (bad.how, error.message())
        for got, want in zip((out[0], out[2]), alone, strict=True):
            for key, value in want.output_tensors.items():
                if value.dtype.kind == "f":
                    np.testing.assert_allclose(got.output_tensors[key], value, atol=1e-5)
                else:
                    np.testing.assert_array_equal(got.output_tensors[key], value)

    check()
    # Every tensor of the stage was broken, in more than one way.
    assert {field for field, _ in seen} == {t.name for t in target.inputs}, seen
    assert len(seen) >= 3 * len(target.inputs), seen
