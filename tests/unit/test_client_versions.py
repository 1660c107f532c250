"""Versioned calls ask only for the versions the server's ensembles declare: every stage's
in the Python-backend repositories, only the Python stages' in NVIDIA's container variant
(native models cannot report one), none in a repository built before versions existed.
Triton refuses a requested output that a model lacks, so asking for all would fail there."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import tests.unit.test_client_transport as fakes
from dynemb.ensembles import ensemble_specs
from dynemb.targets import CPU, TRITON_CONTAINER
from dynemb_client import AsyncInterestClient, InterestClient
from dynemb_client.contract import (
    INTEREST_STAGES,
    RECOMMEND,
    RECOMMEND_STAGES,
    USER_INTEREST,
    version_output,
)
from dynemb_client.transport import reported_stages


def metadata(target, model: str) -> dict:
    """What Triton's model metadata says of an ensemble's outputs, for `target`."""
    spec = ensemble_specs(target=target)[model]
    return {
        **fakes.METADATA,
        "name": model,
        "outputs": [{"name": t.name, "datatype": t.dtype, "shape": []} for t in spec.outputs],
    }


@pytest.mark.parametrize("target", [CPU, TRITON_CONTAINER], ids=lambda t: t.name)
def test_reported_stages_follow_the_ensembles_outputs(target):
    interest = reported_stages(metadata(target, USER_INTEREST), INTEREST_STAGES)
    recommend = reported_stages(metadata(target, RECOMMEND), RECOMMEND_STAGES)
    if target is CPU:
        assert interest == INTEREST_STAGES and recommend == RECOMMEND_STAGES
    else:
        assert interest == ("preprocess",) and recommend == ("preprocess", "retrieve")
    assert reported_stages({"outputs": []}, RECOMMEND_STAGES) == ()  # built before


@pytest.fixture
def container(monkeypatch):
    """A fake server whose ensembles are the container variant's: it answers the versions
    it declares, and refuses (as Triton does) a request for any other output."""
    server = fakes.fake_server(monkeypatch)
    asked: list[list[str]] = []

    def get_model_metadata(self, model_name, as_json=False, client_timeout=None):
        self.server.answer(self.url, "metadata")
        return metadata(TRITON_CONTAINER, model_name)

    def infer(self, model_name, inputs, outputs=None, client_timeout=None):
        names = [o.name() for o in outputs or []]
        asked.append(names)
        declared = {t["name"] for t in metadata(TRITON_CONTAINER, model_name)["outputs"]}
        unknown = set(names) - declared
        if unknown:
            raise InferenceServerException(
                msg=f"unexpected inference output {sorted(unknown)}",
                status="StatusCode.INVALID_ARGUMENT",
            )
        result = self.server.outputs(model_name, inputs)
        batch = len(next(iter(result._outputs.values())))
        for name in names:
            if name.endswith("_VERSION"):
                result._outputs[name] = np.full((batch, 1), 3, np.int64)
        return result

    async def aget_model_metadata(self, *args, **kwargs):
        return get_model_metadata(self, *args, **kwargs)

    async def ainfer(self, *args, **kwargs):
        return infer(self, *args, **kwargs)

    monkeypatch.setattr(fakes.FakeInner, "get_model_metadata", get_model_metadata)
    monkeypatch.setattr(fakes.FakeInner, "infer", infer)
    monkeypatch.setattr(fakes.AsyncFakeInner, "get_model_metadata", aget_model_metadata)
    monkeypatch.setattr(fakes.AsyncFakeInner, "infer", ainfer)
    return server, asked


def test_versioned_calls_against_the_container_variant_report_its_python_stages(container):
    server, asked = container
    with InterestClient("host:1", retries=0) as client:
        embedded = client.embed_many_versioned([fakes.HISTORY])
        recommended = client.recommend_many_versioned([fakes.HISTORY], k=2)
        client.recommend_many_versioned([fakes.HISTORY], k=2)
    assert embedded.versions == {"preprocess": 3}
    assert recommended.versions == {"preprocess": 3, "retrieve": 3}
    assert version_output("text_rnn") not in {n for names in asked for n in names}
    metadata_calls = [c for c in server.calls if c[1] == "metadata"]
    assert len(metadata_calls) == 3  # the shape once, each ensemble's outputs once


def test_the_asyncio_client_does_the_same(container):
    async def ask():
        async with AsyncInterestClient("host:1", retries=0) as client:
            return await client.recommend_many_versioned([fakes.HISTORY], k=2)

    assert asyncio.run(ask()).versions == {"preprocess": 3, "retrieve": 3}
