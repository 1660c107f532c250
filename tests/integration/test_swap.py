"""Hot swap under load: every stage swapped and rolled back with 16 clients sending
`recommend` throughout; 0 failed requests; responses change exactly when a swap succeeds;
bad candidates refused; model control needs the token, inference does not."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dynemb.bench.faults import histories as load_histories
from dynemb.loadgen import LoadGenerator
from dynemb.swap.candidates import make_candidate
from dynemb.swap.swapper import SwapFailedError, Swapper, SwapRefusedError, versions_of
from dynemb_client import build_inputs

FIVE = ("text_rnn", "image_cnn", "label_mlp", "temporal_lstm", "llm_encoder")
T0 = 1_700_000_000.0


def expected_scores(swapper: Swapper, histories) -> list[np.ndarray]:
    """What the repository's newest versions answer for each load history (top-10 scores)."""
    pipeline = swapper.current_pipeline()
    x = build_inputs(histories, [h[-1].time for h in histories], 50, 8, top_k=10)
    return list(pipeline.run(x, "recommend")["ITEM_SCORES"])


def states_of(call, states: list[list[np.ndarray]], histories) -> set[int]:
    """Indices of the repository states whose answer this call got."""
    want = np.array(call.scores)
    h = call.client % len(histories)
    return {i for i, state in enumerate(states) if np.abs(state[h] - want).max() <= 1e-4}


@pytest.fixture
def swapper(live):
    return Swapper(live.repository, live.url, token=live.token)


def test_swap_each_stage_and_roll_back_under_load(live, swapper, tmp_path):
    histories = load_histories()
    states = [expected_scores(swapper, histories)]
    windows = []  # (started, finished) of each successful swap, in order
    with LoadGenerator(live.url, histories, clients=16, max_seconds=900) as load:
        time.sleep(2)
        for stage in FIVE:
            # 10% weight noise: on trained weights 2% moved some stages' top-10 scores by
            # less than the 1e-4 that tells two repository states apart. Drift bounds are
            # waived: the drift test below covers them.
            candidate = make_candidate(live.repository, stage, tmp_path / stage, scale=0.1)
            before = versions_of(live.repository / stage)[-1]
            for action in ("swap", "rollback"):
                started = time.monotonic()
                if action == "swap":
                    result = swapper.swap(stage, candidate, accept_drift=True)
                else:
                    result = swapper.rollback(stage)
                windows.append((started, time.monotonic()))
                assert result.new_version == result.old_version + 1
                states.append(expected_scores(swapper, histories))
            assert versions_of(live.repository / stage)[-1] == before + 2
        time.sleep(2)
    calls = load.snapshot()
    assert not [c for c in calls if c.error], [c.error for c in calls if c.error][:3]
    assert len(calls) > 200
    # Each swap really changed the answers, and each rollback restored them.
    for i in range(0, len(windows), 2):
        assert (
            max(np.abs(a - b).max() for a, b in zip(states[i], states[i + 1], strict=True)) > 1e-4
        )
        assert (
            max(np.abs(a - b).max() for a, b in zip(states[i], states[i + 2], strict=True)) <= 1e-5
        )
    # A response is from the state before a swap until that swap starts, from the state
    # after it once it has reported success, and from one of the two in between.
    for call in calls:
        got = states_of(call, states, histories)
        before = sum(1 for _, finished in windows if finished < call.started)
        after = sum(1 for started, _ in windows if started < call.finished)
        assert any(before <= i <= after for i in got), (call, got, before, after, windows)


@pytest.mark.parametrize("kind", ["nan", "broken", "signature"])
def test_bad_candidates_are_refused_and_the_old_version_serves(live, swapper, tmp_path, kind):
    stage = "label_mlp"
    before = versions_of(live.repository / stage)
    candidate = make_candidate(live.repository, stage, tmp_path / kind, kind=kind)
    with (
        LoadGenerator(live.url, load_histories(), clients=16, max_seconds=120) as load,
        pytest.raises(SwapRefusedError) as info,
    ):
        swapper.swap(stage, candidate, accept_drift=True)
    message = str(info.value)
    assert {"nan": "NaN", "broken": "initialize", "signature": "signature"}[kind] in message
    assert versions_of(live.repository / stage) == before
    assert not load.failed and load.snapshot()


def test_candidate_failing_in_the_server_is_rolled_back(live, swapper, tmp_path):
    """Skip the local pre-check so that initialize raises inside tritonserver itself."""
    stage = "temporal_lstm"
    before = versions_of(live.repository / stage)
    candidate = make_candidate(live.repository, stage, tmp_path / "broken", kind="broken")
    expected = expected_scores(swapper, load_histories())
    with (
        LoadGenerator(live.url, load_histories(), clients=16, max_seconds=120) as load,
        pytest.raises(SwapFailedError),
    ):
        swapper.swap(stage, candidate, precheck=False)
    assert versions_of(live.repository / stage) == before
    client = grpcclient.InferenceServerClient(live.url)
    assert client.is_model_ready(stage, str(before[-1]))
    assert not load.failed
    for call in load.snapshot():
        assert np.abs(np.array(call.scores) - expected[call.client % 3]).max() <= 1e-4


def test_drift_out_of_bounds_is_refused_unless_accepted(live, swapper, tmp_path):
    stage = "llm_encoder"
    before = versions_of(live.repository / stage)
    candidate = make_candidate(live.repository, stage, tmp_path / "reinit", kind="reinit")
    with pytest.raises(SwapRefusedError, match="drift out of bounds"):
        swapper.swap(stage, candidate)
    assert versions_of(live.repository / stage) == before


def test_model_control_needs_the_token_but_inference_does_not(live):
    client = grpcclient.InferenceServerClient(live.url)
    for call in (
        lambda: client.load_model("label_mlp"),
        lambda: client.unload_model("label_mlp"),
        lambda: client.get_model_repository_index(),
        lambda: client.load_model(
            "label_mlp", headers={"triton-grpc-protocol-dynemb-control": "wrong"}
        ),
    ):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert "not allowed" in info.value.message() or "restricted" in info.value.message().lower()
    assert client.is_model_ready("label_mlp") and client.is_model_ready("recommend")
    x = build_inputs([load_histories()[0]], [None], 50, 8)
    inputs = []
    for name, value in x.items():
        tensor = grpcclient.InferInput(
            name,
            list(value.shape),
            {"object": "BYTES", "float64": "FP64", "int32": "INT32"}[str(value.dtype)],
        )
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    assert client.infer("user_interest", inputs).as_numpy("USER_EMBEDDING").shape == (1, 128)
    index = client.get_model_repository_index(
        headers={"triton-grpc-protocol-dynemb-control": live.token}
    )
    assert index is not None


def test_log_and_trace_settings_need_the_token_over_grpc_and_http(live):
    client = grpcclient.InferenceServerClient(live.url)
    token = {"triton-grpc-protocol-dynemb-control": live.token}
    for call in (
        lambda h: client.update_log_settings({"log_verbose_level": 0}, headers=h),
        lambda h: client.get_log_settings(headers=h),
        lambda h: client.update_trace_settings(settings={"trace_rate": "1000"}, headers=h),
        lambda h: client.get_system_shared_memory_status(headers=h),
    ):
        with pytest.raises(InferenceServerException) as info:
            call(None)
        assert "not allowed" in info.value.message() or "restricted" in info.value.message().lower()
        call(token)  # with the token it is allowed
    base = f"http://127.0.0.1:{live.config.http_port}"
    for path, body in (
        ("/v2/logging", b'{"log_verbose_level": 0}'),
        ("/v2/trace/setting", b'{"trace_rate": "1000"}'),
        ("/v2/repository/models/label_mlp/load", b"{}"),
        ("/v2/repository/index", b"{}"),
    ):
        request = urllib.request.Request(base + path, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as http_info:
            urllib.request.urlopen(request, timeout=10)
        assert http_info.value.code in (400, 403), (path, http_info.value.code)
        allowed = urllib.request.Request(
            base + path, data=body, method="POST", headers={"dynemb-control": live.token}
        )
        if "load" not in path:  # a real load would reload label_mlp under other tests
            assert urllib.request.urlopen(allowed, timeout=10).status == 200, path
    assert client.is_model_ready("label_mlp")


def test_ctrl_c_while_the_server_loads_n_plus_1_restores_n(live, swapper, tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) while the server loads N+1: the swap removed N+1 while the load
    went on in the server, which left the stage LOADING for good and the server not ready
    until it restarted. The load is sent and the swap interrupted at once, as a signal
    during the load call leaves it."""
    import threading

    from dynemb import control

    stage = "label_mlp"
    before = versions_of(live.repository / stage)
    candidate = make_candidate(live.repository, stage, tmp_path / "c", scale=0.1)
    load, sent = control.load_model, []

    def load_then_interrupted(client, model, token, timeout_s=None):
        if sent:  # the restore's own load
            return load(client, model, token, timeout_s)
        sent.append(threading.Thread(target=load, args=(client, model, token)))
        sent[0].start()
        deadline = time.monotonic() + 30  # interrupted while the server loads N+1
        while not control.loading_versions(client, model, token):
            assert time.monotonic() < deadline, "the server never reported the load"
            time.sleep(0.01)
        raise KeyboardInterrupt

    monkeypatch.setattr(control, "load_model", load_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        swapper.swap(stage, candidate, accept_drift=True)
    monkeypatch.undo()
    sent[0].join(timeout=120)
    assert versions_of(live.repository / stage) == before
    client = grpcclient.InferenceServerClient(live.url)
    # The stage and the ensembles, not the server's own readiness: a version that failed
    # to load earlier in this file (a broken candidate) keeps that false.
    for model in (stage, "user_interest", "recommend"):
        assert client.is_model_ready(model, str(before[-1]) if model == stage else "")
    swapped = swapper.swap(stage, candidate, accept_drift=True)  # and the next swap works
    assert swapped.new_version == before[-1] + 1
    swapper.rollback(stage)


def test_a_swap_without_the_control_token_installs_nothing(live, tmp_path):
    """It installed N+1, ran its checks and then failed on the load with two tracebacks."""
    stage = "text_rnn"
    before = versions_of(live.repository / stage)
    untokened = Swapper(live.repository, live.url, token=None)
    candidate = make_candidate(live.repository, stage, tmp_path / "c", scale=0.1)
    with pytest.raises(SwapRefusedError, match="model control refused"):
        untokened.swap(stage, candidate, accept_drift=True)
    assert versions_of(live.repository / stage) == before
