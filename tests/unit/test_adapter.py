"""model.py through a fake triton_python_backend_utils: batching across, errors per request."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from dynemb.dims import DIMS
from dynemb.ensembles import STAGE_SPECS
from dynemb_client import Event, build_inputs

from . import fake_pb_utils

T0 = 1_700_000_000.0
CHECKOUT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def model_config(stage: str) -> str:
    """The committed config.pbtxt as the JSON Triton hands to `initialize`."""
    text = (CHECKOUT_REPOSITORY / stage / "config.pbtxt").read_text()
    config = text_format.Parse(text, mc.ModelConfig())
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def load_model(repo, stage, config: str | None = None):
    """Import the committed model.py the way the backend does, with the fake utils, and
    initialize it with the committed config (or `config`)."""
    sys.modules["triton_python_backend_utils"] = fake_pb_utils
    try:
        path = CHECKOUT_REPOSITORY / stage / "1" / "model.py"
        spec = importlib.util.spec_from_file_location(f"model_{stage}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        del sys.modules["triton_python_backend_utils"]
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_repository": str(repo / stage),
            "model_version": "1",
            "model_config": model_config(stage) if config is None else config,
        }
    )
    return model


def raw(users, top_k=None):
    return build_inputs(users, [None] * len(users), DIMS.max_events, DIMS.max_labels, top_k)


def test_preprocess_bad_request_fails_alone(repo, png):
    model = load_model(repo, "preprocess")
    good = raw([[Event(T0, "fine", png, ["category:c1"])]])
    bad = raw([[Event(T0, "fine")]])
    bad["EVENT_TEXT"][0, 0] = b"\xff"
    out = model.execute([fake_pb_utils.InferenceRequest(x) for x in (good, bad, good)])
    assert [r.has_error() for r in out] == [False, True, False]
    assert "EVENT_TEXT[0]" in out[1].error.message()
    assert out[0].output_tensors["IMAGE_MASK"][0, 0]


def test_a_preprocess_batch_with_bad_rows_runs_again_without_them(repo, png, monkeypatch):
    """Bad input found in the batch call names its row: that row's request gets the
    error and the rest run again together (not each alone), whatever the requests' sizes;
    each answer is the one it gets alone."""
    model = load_model(repo, "preprocess")
    runner = model.runner
    calls = []
    call = type(runner).__call__
    monkeypatch.setattr(type(runner), "__call__", lambda self, x: calls.append(1) or call(self, x))
    users = [
        [Event(T0 + u, f"title {u}", png if u % 2 else None, [f"category:c{u}"])] for u in range(6)
    ]
    sizes = (2, 1, 2, 1)  # requests of several users
    bad_rows = {2, 5}  # request 1's only user and request 3's
    requests = []
    first = 0
    for size in sizes:
        x = raw(users[first : first + size])
        for b in range(size):
            if first + b in bad_rows:
                x["EVENT_TEXT"][b, 0] = b"\xff"
        requests.append(x)
        first += size
    out = model.execute([fake_pb_utils.InferenceRequest(x) for x in requests])
    assert [r.has_error() for r in out] == [False, True, False, True]
    assert "EVENT_TEXT[0]" in out[1].error.message()
    assert len(calls) == 3  # the batch, without request 1, without request 3 too
    for x, answer in zip(requests, out, strict=True):
        if not answer.has_error():
            [alone] = model.execute([fake_pb_utils.InferenceRequest(x)])
            for name, value in alone.output_tensors.items():
                np.testing.assert_array_equal(answer.output_tensors[name], value)


def test_torch_stage_runs_once_for_all_requests(repo, monkeypatch):
    model = load_model(repo, "label_mlp")
    calls = []
    original = model.runner.runtime
    monkeypatch.setattr(model.runner, "runtime", lambda x: calls.append(x) or original(x))
    ids = [
        np.random.default_rng(i).integers(0, 5, (n, DIMS.max_events, 8))
        for i, n in enumerate((1, 3, 2))
    ]
    out = model.execute([fake_pb_utils.InferenceRequest({"LABEL_IDS": x}) for x in ids])
    # One runtime call for the whole batch, on each distinct label set once.
    distinct = {row.tobytes() for x in ids for row in x.reshape(-1, 8)}
    assert len(calls) == 1 and len(calls[0]["LABEL_IDS"]) == len(distinct)
    assert [r.output_tensors["LABEL_VEC"].shape[0] for r in out] == [1, 3, 2]
    alone = model.execute([fake_pb_utils.InferenceRequest({"LABEL_IDS": ids[1]})])[0]
    np.testing.assert_allclose(
        alone.output_tensors["LABEL_VEC"], out[1].output_tensors["LABEL_VEC"], atol=1e-6
    )


def test_every_answer_says_which_version_computed_it(repo):
    model = load_model(repo, "label_mlp")
    assert model.version == 1  # read from Triton's model_version
    model.version = 7  # as if Triton had loaded version directory 7
    ids = [np.zeros((n, DIMS.max_events, 8), dtype=np.int64) for n in (1, 3)]
    out = model.execute([fake_pb_utils.InferenceRequest({"LABEL_IDS": x}) for x in ids])
    for response, n in zip(out, (1, 3), strict=True):
        version = response.output_tensors["LABEL_MLP_VERSION"]
        assert version.dtype == np.int64 and version.shape == (n, 1)
        assert (version == 7).all()


def test_a_repository_built_without_version_outputs_serves_on_without_them(repo):
    """Triton refuses an output its config does not declare."""
    old = json.loads(model_config("label_mlp"))
    old["output"] = [o for o in old["output"] if o["name"] != "LABEL_MLP_VERSION"]
    model = load_model(repo, "label_mlp", json.dumps(old))
    ids = np.zeros((2, DIMS.max_events, 8), dtype=np.int64)
    [response] = model.execute([fake_pb_utils.InferenceRequest({"LABEL_IDS": ids})])
    assert set(response.output_tensors) == {"LABEL_VEC"}


def test_wrong_shape_or_dtype_is_a_per_request_error(repo):
    model = load_model(repo, "label_mlp")
    good = np.zeros((1, DIMS.max_events, 8), dtype=np.int64)
    requests = [
        {"LABEL_IDS": good},
        {"LABEL_IDS": good.astype(np.float32)},
        {"LABEL_IDS": np.zeros((1, 3, 8), dtype=np.int64)},
        {},
    ]
    out = model.execute([fake_pb_utils.InferenceRequest(x) for x in requests])
    assert [r.has_error() for r in out] == [False, True, True, True]
    assert "LABEL_IDS" in out[1].error.message() and "dtype" in out[1].error.message()
    assert "shape" in out[2].error.message() and "missing" in out[3].error.message()


def test_retrieve_top_k_per_request(repo):
    model = load_model(repo, "retrieve")
    emb = np.random.default_rng(0).normal(size=(2, DIMS.embed_dim)).astype(np.float32)
    requests = [
        {"USER_EMBEDDING": emb, "TOP_K": np.array([[3], [3]], dtype=np.int32)},
        {"USER_EMBEDDING": emb[:1], "TOP_K": np.array([[0]], dtype=np.int32)},
        {"USER_EMBEDDING": emb[:1], "TOP_K": np.array([[10]], dtype=np.int32)},
    ]
    out = model.execute([fake_pb_utils.InferenceRequest(x) for x in requests])
    assert out[0].output_tensors["ITEM_IDS"].shape == (2, 3)
    assert out[1].has_error() and "TOP_K" in out[1].error.message()
    scores = out[2].output_tensors["ITEM_SCORES"][0]
    assert len(scores) == 10 and np.all(np.diff(scores) <= 0)
    np.testing.assert_array_equal(
        out[2].output_tensors["ITEM_IDS"][0, :3], out[0].output_tensors["ITEM_IDS"][0]
    )


def test_internal_error_is_logged_with_traceback_and_reported(repo, monkeypatch):
    model = load_model(repo, "temporal_lstm")

    def boom(*args):
        raise RuntimeError("kaput")

    monkeypatch.setattr(model.runner, "runtime", boom)
    spec = STAGE_SPECS["temporal_lstm"]
    x = {t.name: np.zeros((1, *t.dims), dtype=t.numpy_dtype) for t in spec.inputs}
    out = model.execute([fake_pb_utils.InferenceRequest(x)])
    assert out[0].has_error() and "kaput" in out[0].error.message()
    assert any("Traceback" in m for m in fake_pb_utils.Logger.messages)


def test_retrieve_refuses_an_embedding_that_would_overflow_its_scores(repo):
    """A finite 3e38 made ITEM_SCORES infinite, reported as retrieve's own failure
    (INTERNAL); clients call retrieve directly with a session's E_t."""
    model = load_model(repo, "retrieve")
    emb = np.zeros((1, DIMS.embed_dim), np.float32)
    emb[0, 3] = 3e38
    request = {"USER_EMBEDDING": emb, "TOP_K": np.array([[3]], dtype=np.int32)}
    [out] = model.execute([fake_pb_utils.InferenceRequest(request)])
    assert out.has_error() and "USER_EMBEDDING[0][3]" in out.error.message()
    assert out.error.code() == fake_pb_utils.TritonError.INVALID_ARG


def test_a_stage_s_cache_metrics_are_published_without_further_requests(repo):
    """They were published from execute, at most once a second: the last second of a
    burst stayed unpublished until the next request."""
    import time

    model = load_model(repo, "label_mlp")
    for first in (5, 9):  # two requests in a burst, three new rows each
        labels = np.zeros((1, DIMS.max_events, DIMS.max_labels), np.int64)
        labels[0, :3, 0] = [first, first + 1, first + 2]
        [answer] = model.execute([fake_pb_utils.InferenceRequest({"LABEL_IDS": labels})])
        assert answer.error is None
    mine = [
        m
        for m in fake_pb_utils.MetricFamily.created
        if m.labels.get("model") == "label_mlp" and m.family.name == "dynemb_cache_entries"
    ][-1]
    deadline = time.monotonic() + 10
    held = model.runner.caches()["labels"].stats().entries
    while mine.value != held:  # no request since: the publisher alone
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert held > 3
    model.finalize()
    assert not model.publisher.alive
