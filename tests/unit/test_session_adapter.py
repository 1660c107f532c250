"""The `session` model's adapter driven without a server (a stand-in for the backend's
utilities): its answers, and what a stopping server's readiness errors become."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from dynemb.serving.byte_tensors import deserialize_bytes_tensor
from dynemb.sessions.serving import SessionAdapter
from dynemb_client import Event, build_inputs
from dynemb_client import contract as wire

from . import fake_pb_utils


class ServerStoppingError(RuntimeError):
    pass


@pytest.fixture
def adapter(repo):
    state = {"stopping": False}

    def is_model_ready(name: str, version: str = "") -> bool:
        if state["stopping"]:
            raise ServerStoppingError("Failed to check model readiness: Server not ready")
        return True

    pb = types.SimpleNamespace(**vars(fake_pb_utils), is_model_ready=is_model_ready)

    class Adapter(SessionAdapter):
        pb_utils = pb

    model = Adapter()
    declared = {"output": [{"name": wire.version_output(s)} for s in wire.INTEREST_STAGES]}
    model.initialize(
        {"model_repository": str(repo / wire.SESSION), "model_config": json.dumps(declared)}
    )
    model.options = type(model.options)(version_check_s=0.0)  # ask the server every batch
    return model, state


def request(session: str, op: int, events: list[Event], at: float):
    x = build_inputs([events], [at], max(1, len(events)), 8)
    x[wire.SESSION_ID] = np.array([[session.encode()]], dtype=object)
    x[wire.SESSION_OP] = np.array([[op]], dtype=np.int32)
    return fake_pb_utils.InferenceRequest(x)


def test_a_stopping_server_makes_requests_unavailable_not_internal(adapter):
    model, state = adapter
    events = [Event(1.7e9 + 60 * i, f"item {i}") for i in range(3)]
    [started] = model.execute([request("u", wire.OP_START, events, events[-1].time)])
    assert not started.has_error()
    assert started.output_tensors[wire.SESSION_EVENTS].item() == 3
    state["stopping"] = True
    [refused] = model.execute(
        [request("u", wire.OP_UPDATE, [Event(1.7e9 + 600, "x")], 1.7e9 + 600)]
    )
    assert refused.has_error() and refused.error.code() == fake_pb_utils.TritonError.UNAVAILABLE
    assert "readiness unknown" in refused.error.message()
    state["stopping"] = False
    [later] = model.execute([request("u", wire.OP_UPDATE, [Event(1.7e9 + 600, "x")], 1.7e9 + 600)])
    assert not later.has_error() and later.output_tensors[wire.SESSION_EVENTS].item() == 4


def test_it_reads_bytes_inputs_with_the_fast_reader(adapter):
    model, _ = adapter
    assert model.pb_utils.deserialize_bytes_tensor is deserialize_bytes_tensor


def test_only_the_asked_outputs_are_made(adapter):
    model, _ = adapter

    class Asking(fake_pb_utils.InferenceRequest):
        def requested_output_names(self):
            return [wire.USER_EMBEDDING, wire.SESSION_STATUS]

    plain = request("v", wire.OP_START, [Event(1.7e9, "a")], 1.7e9)
    asking = Asking({t.name(): t.as_numpy() for t in plain.tensors.values()})
    [answer] = model.execute([asking])
    assert set(answer.output_tensors) == {wire.USER_EMBEDDING, wire.SESSION_STATUS}
    [everything] = model.execute([request("w", wire.OP_START, [Event(1.7e9, "a")], 1.7e9)])
    assert wire.version_output(wire.INTEREST_STAGES[0]) in everything.output_tensors


def test_a_version_installed_again_under_its_number_is_reloaded_and_drops_states(repo, tmp_path):
    """A swap that failed removes its version N+1 and the next swap installs other weights
    as N+1 again: the same numbers, another install. The session model loads it and
    drops every state (computed by the weights that are gone), as after any swap."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)

    class Adapter(SessionAdapter):
        pb_utils = types.SimpleNamespace(**vars(fake_pb_utils), is_model_ready=lambda *a: True)

    model = Adapter()
    model.initialize({"model_repository": str(copy / wire.SESSION), "model_config": "{}"})
    model.options = type(model.options)(version_check_s=0.0)
    loaded = model.engine
    events = [Event(1.7e9 + 60 * i, f"item {i}") for i in range(3)]
    model.execute([request("u", wire.OP_START, events, events[-1].time)])
    later = [Event(1.7e9 + 600, "x")]
    [same] = model.execute([request("u", wire.OP_UPDATE, later, 1.7e9 + 600)])
    assert (
        model.engine is loaded and same.output_tensors[wire.SESSION_STATUS].item() == wire.STATUS_OK
    )
    version = next(p for p in (copy / "text_rnn").iterdir() if p.name.isdigit())
    shutil.copytree(version, tmp_path / "again")  # the next install: a new directory
    shutil.rmtree(version)
    (tmp_path / "again").rename(version)
    [lost] = model.execute([request("u", wire.OP_UPDATE, later, 1.7e9 + 700)])
    assert model.engine is not loaded
    assert lost.output_tensors[wire.SESSION_STATUS].item() == wire.STATUS_UNKNOWN


def test_the_store_is_published_and_expired_without_requests(adapter):
    """The metrics and the TTL had waited for a request: a burst of sessions followed by
    quiet was never published, nor was an unused state ever dropped."""
    import time

    model, _ = adapter
    metrics = {m.family.name: m for m in fake_pb_utils.MetricFamily.created}
    users = metrics["dynemb_session_users"]
    events = [Event(1.7e9 + 60 * i, f"item {i}") for i in range(2)]
    for user in ("a", "b", "c"):
        [answer] = model.execute([request(user, wire.OP_START, events, events[-1].time)])
        assert not answer.has_error()
    deadline = time.monotonic() + 10
    while users.value != 3:  # no request since: the publisher alone
        assert time.monotonic() < deadline, users.value
        time.sleep(0.05)
    model.store.ttl_s = 0.0  # every state is now past its TTL
    while users.value != 0:
        assert time.monotonic() < deadline, users.value
        time.sleep(0.05)
    assert metrics["dynemb_session_expirations_total"].value == 3 and len(model.store) == 0
    model.finalize()
    assert not model.publisher.alive


def test_a_metric_call_that_fails_partway_never_counts_twice():
    """The counters' published values were all set after the whole update, so one that
    failed partway made the next update add the ones before it again."""
    from dynemb.sessions.serving import SessionMetrics
    from dynemb.sessions.state import StoreStats

    metrics = SessionMetrics(fake_pb_utils)
    published = {name: metric for name, (_, metric) in metrics._metrics.items()}
    failing = published["misses"]
    real = failing.increment
    calls = []

    def once_broken(value):
        calls.append(value)
        if len(calls) == 1:
            raise RuntimeError("metrics round trip failed")
        real(value)

    failing.increment = once_broken
    stats = StoreStats(users=2, bytes=10, hits=5, misses=3)
    with pytest.raises(RuntimeError):
        metrics.update(stats)
    metrics.update(stats)
    assert published["hits"].value == 5 and published["misses"].value == 3
    assert published["users"].value == 2
