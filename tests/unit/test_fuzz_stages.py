"""Property-based fuzzing of every stage model through its model.py (fake backend): a
malformed request, batched between two good ones, fails alone with INVALID_ARG naming the
tensor it broke; its neighbours get exactly the answer they get alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynemb import stages
from dynemb.bench.fuzz import Ranges, malformed
from dynemb.data.synthetic import draw_item_image
from dynemb.dims import DIMS
from dynemb.pipeline import Pipeline
from dynemb_client import Event, build_inputs

from . import fake_pb_utils
from .test_adapter import load_model

T0 = 1_700_000_000.0
EXAMPLES = 150  # per stage: 7 stages, over a thousand malformed requests in all


def users(n: int, seed: int) -> list[list[Event]]:
    rng = random.Random(seed)
    return [
        [
            Event(
                T0 + 600 * i + u,
                f"{rng.choice(['red', 'blue'])} lamp {rng.randrange(9)}",
                draw_item_image(i % 3, random.Random(i), 32) if i % 2 else None,
                [f"category:c{i % 4}", "rating:4"],
            )
            for i in range(3 + 4 * u)
        ]
        for u in range(n)
    ]


@pytest.fixture(scope="module")
def requests_by_model(repo):
    """Three good requests (two users each) of every stage, as the ensemble feeds it."""
    pipeline = Pipeline.from_repository(repo)
    out = {}
    history = users(6, seed=3)
    x = build_inputs(history, [None] * 6, DIMS.max_events, DIMS.max_labels, top_k=5)
    tensors = pipeline.run(x, "recommend")
    for name, runner in pipeline.runners.items():
        names = [t.name for t in runner.spec.inputs]
        out[name] = [{n: tensors[n][i : i + 2] for n in names} for i in (0, 2, 4)]
    return out


@pytest.fixture(scope="module")
def ranges(repo):
    pipeline = Pipeline.from_repository(repo)
    manifests = {name: r.manifest for name, r in pipeline.runners.items()}
    return Ranges.of(
        vocab_size=manifests["text_rnn"].hparams.vocab_size,
        n_labels=manifests["label_mlp"].hparams.n_labels,
        max_tokens=DIMS.max_tokens,
        max_events=DIMS.max_events,
        max_k=DIMS.max_top_k,
    )


@pytest.fixture(scope="module")
def models(repo):
    return {name: load_model(repo, name) for name in stages.NAMES}


@pytest.mark.parametrize("name", stages.NAMES)
def test_a_malformed_request_fails_alone_and_names_its_tensor(
    name, models, requests_by_model, ranges
):
    model, good = models[name], requests_by_model[name]
    spec = stages.get(name).spec(DIMS)
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
        bad = data.draw(malformed(name, spec.inputs, good[2], ranges))
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
    assert {field for field, _ in seen} == {t.name for t in spec.inputs}, seen
    assert len(seen) >= 3 * len(spec.inputs), seen
