"""The GPU target's code path, run on the CPU: each neural stage's stage-level function in
torch on a device (`DeviceRunner`) answers what the served CPU runner answers; precision
and DLPack are options read from the config; a stage handed its inputs as device tensors
(DLPack) reads them where they are, checks them, and hands its outputs back the same way.
On a GPU, tests/gpu holds the same runners to the CPU fp32 answers."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from dynemb import stages
from dynemb.configs import stage_config
from dynemb.dims import DIMS
from dynemb.pipeline import Pipeline, eager_uncached, latest_version
from dynemb.stages import RunnerOptions, load_runner
from dynemb.stages.torch_stage import DeviceRunner
from dynemb.targets import GPU
from dynemb_client import Event, build_inputs

from . import fake_pb_utils
from .test_adapter import load_model
from .test_stage_onnx import NEURAL, users

TOLERANCE = 1e-4
ON_CPU = RunnerOptions(runtime="torch", device="cpu")


@pytest.fixture(scope="module")
def wire():
    histories = users()
    return build_inputs(histories, [None] * len(histories), DIMS.max_events, DIMS.max_labels, 10)


@pytest.fixture(scope="module")
def tensors(repo, wire):
    return Pipeline.from_repository(repo, eager_uncached()).run(wire, "recommend")


@pytest.fixture(scope="module")
def served(repo):
    return Pipeline.from_repository(repo)


@pytest.mark.parametrize("name", NEURAL)
def test_device_runner_equals_the_served_runner_batched_and_single(repo, tensors, served, name):
    runner = load_runner(latest_version(repo / name), options=ON_CPU)
    assert isinstance(runner, DeviceRunner)
    step = {t.name: tensors[t.name] for t in runner.spec.inputs}
    output = runner.spec.outputs[0].name
    want = served.runners[name](step)[output]
    got = runner(step)[output]
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
    for i in range(len(got)):
        alone = runner({k: v[i : i + 1] for k, v in step.items()})[output]
        np.testing.assert_allclose(alone[0], want[i], atol=TOLERANCE, rtol=0)


def test_the_device_runner_checks_requests_as_the_served_runner_does(repo, tensors):
    from dynemb.errors import InputError

    text = load_runner(latest_version(repo / "text_rnn"), options=ON_CPU)
    ids = tensors["TOKEN_IDS"].copy()
    ids[1, 2, 3] = 10**6
    with pytest.raises(InputError, match=r"TOKEN_IDS\[1\]\[2\]\[3\]"):
        text.check({"TOKEN_IDS": ids, "TOKEN_COUNT": tensors["TOKEN_COUNT"]})
    lstm = load_runner(latest_version(repo / "temporal_lstm"), options=ON_CPU)
    step = {t.name: tensors[t.name] for t in lstm.spec.inputs}
    step["TIME_FEATURES"] = step["TIME_FEATURES"].copy()
    step["TIME_FEATURES"][0, 0, 0] = np.nan
    with pytest.raises(InputError, match="TIME_FEATURES"):
        lstm.check(step)
    step = {t.name: tensors[t.name] for t in lstm.spec.inputs}
    step["TEXT_VEC"] = torch.from_numpy(step["TEXT_VEC"].copy())  # a device tensor
    step["TEXT_VEC"][2, 1, 0] = float("inf")
    with pytest.raises(InputError, match=r"TEXT_VEC\[2\]\[1\]\[0\]"):
        lstm.check(step)


def test_a_device_needs_the_torch_runtime_and_a_known_precision(repo):
    directory = latest_version(repo / "label_mlp")
    with pytest.raises(ValueError, match="runtime=torch"):
        load_runner(directory, options=RunnerOptions(runtime="onnxruntime", device="cpu"))
    with pytest.raises(ValueError, match="precision"):
        RunnerOptions(runtime="torch", device="cpu", precision="int4")
    with pytest.raises(ValueError, match="need a device"):
        RunnerOptions(runtime="torch", dlpack=True)
    parameters = dict(dataclasses.replace(ON_CPU, precision="bf16", dlpack=True).parameters())
    runner = load_runner(directory, parameters=parameters)
    assert isinstance(runner, DeviceRunner) and runner.autocast is torch.bfloat16
    assert runner.device_inputs
    assert RunnerOptions.from_parameters({"device": "cuda"}, ON_CPU).on_device(3).device == (
        "cuda:3"
    )


def test_pipeline_keeps_tensors_on_the_device_between_stages(repo, wire, served):
    """In-process, DLPack's counterpart: each GPU stage's output is a torch tensor read by
    the next one where it is; only retrieve (a host stage) gets numpy."""
    on_device = dataclasses.replace(ON_CPU, dlpack=True)
    options = {name: on_device for name in NEURAL}
    pipeline = Pipeline.from_repository(repo, options)
    tensors = pipeline.run(wire, "recommend")
    assert all(isinstance(tensors[n], torch.Tensor) for n in ("TEXT_VEC", "SEQ_FEATURES"))
    want = served.run(wire, "recommend")
    np.testing.assert_allclose(
        tensors["USER_EMBEDDING"].numpy(), want["USER_EMBEDDING"], atol=TOLERANCE, rtol=0
    )
    np.testing.assert_array_equal(tensors["ITEM_IDS"], want["ITEM_IDS"])


def test_bf16_autocast_runs_and_stays_close(repo, wire, served):
    """bf16 on this CPU exercises the autocast path; the 0.999 cosine target is held on a
    GPU (tests/gpu). Here: finite, unit norm, and close to fp32."""
    bf16 = dataclasses.replace(ON_CPU, precision="bf16")
    got = Pipeline.from_repository(repo, {name: bf16 for name in NEURAL}).embed(wire)
    want = served.embed(wire)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    assert (np.sum(got * want, axis=1) > 0.99).all()


def gpu_variant_config(stage: str) -> str:
    """The gpu variant's config for `stage`, with its device made this CPU."""
    target = dataclasses.replace(GPU, device="cpu", precision="fp32")
    config = stage_config(target.stage_spec(stages.get(stage), DIMS))
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


def test_adapter_reads_device_inputs_by_dlpack_and_answers_by_dlpack(repo, tensors, served):
    config = json.loads(gpu_variant_config("temporal_lstm"))
    assert config["parameters"]["FORCE_CPU_ONLY_INPUT_TENSORS"]["string_value"] == "no"
    model = load_model(repo, "temporal_lstm", json.dumps(config))
    assert isinstance(model.runner, DeviceRunner) and model.runner.device_inputs
    names = [t.name for t in model.runner.spec.inputs]
    step = {n: tensors[n] for n in names}
    device = ("TEXT_VEC", "IMAGE_VEC", "LABEL_VEC")  # what GPU stages produced
    parts = [
        {n: torch.from_numpy(v[i:j].copy()) if n in device else v[i:j] for n, v in step.items()}
        for i, j in ((0, 1), (1, 4))
    ]
    bad = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in parts[0].items()}
    bad["IMAGE_VEC"][0, 0, 0] = float("nan")
    fake_pb_utils.Tensor.dlpack_outputs.clear()
    requests = [fake_pb_utils.InferenceRequest(x, on_device=device) for x in (*parts, bad)]
    out = model.execute(requests)
    assert [r.has_error() for r in out] == [False, False, True]
    assert "IMAGE_VEC[0][0][0]" in out[2].error.message()
    assert fake_pb_utils.Tensor.dlpack_outputs == ["SEQ_FEATURES", "SEQ_FEATURES"]
    got = np.concatenate([r.output_tensors["SEQ_FEATURES"] for r in out[:2]])
    want = served.runners["temporal_lstm"](step)["SEQ_FEATURES"]
    np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)
    assert (out[1].output_tensors["TEMPORAL_LSTM_VERSION"] == 1).all()


def test_a_host_stage_of_the_gpu_variant_reads_numpy_as_before(repo, png):
    model = load_model(repo, "preprocess", gpu_variant_config("preprocess"))
    assert not model.runner.device_inputs
    x = build_inputs([[Event(1.7e9, "a lamp", png)]], [None], DIMS.max_events, DIMS.max_labels)
    [response] = model.execute([fake_pb_utils.InferenceRequest(x)])
    assert not response.has_error() and response.output_tensors["IMAGE_MASK"][0, 0]


def test_the_cuda_memory_pool_is_a_flag_only_when_asked_for():
    from dynemb.server import ServerConfig, serving_flags

    pool = [f for f in serving_flags(ServerConfig(cuda_memory_pool_mb=2048), "r") if "pool" in f]
    assert pool == ["--cuda-memory-pool-byte-size=0:2147483648"]
    assert not [f for f in serving_flags(ServerConfig(), "r") if "pool" in f]


def test_requests_of_one_batch_may_hold_device_tensors_and_host_arrays():
    from dynemb.serving.arrays import concat, split

    host = np.arange(6, dtype=np.float32).reshape(3, 2)
    joined = concat([torch.from_numpy(host[:1].copy()), host[1:]])
    assert isinstance(joined, torch.Tensor)
    np.testing.assert_array_equal(joined.numpy(), host)
    assert [p.shape[0] for p in split(joined, [1, 2])] == [1, 2]
    assert isinstance(concat([host[:1], host[1:]]), np.ndarray)
