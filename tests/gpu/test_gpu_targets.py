"""GPU tier for the gpu build target: where CUDA exists, the runners the gpu variant serves
(the stage-level function in torch on the GPU, at the variant's precision, tensors kept on
the device between stages) answer what the CPU fp32 pipeline answers, and every stage's
`stage.onnx` under ONNX Runtime on the CPU answers what torch computes on the GPU.

Skipped without CUDA; DYNEMB_EXPECT_GPU=1 makes a missing GPU a failure instead (the GPU
benchmark's device command sets it). Nothing here ran in this project's CI, which has no
GPU: see benchmarks/gpu/README.md for the one command that runs it on a lent GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dynemb import stages
from dynemb.bench.gpu import COSINE_TARGET, _pretrained_available
from dynemb.bench.histories import synthetic_with_images
from dynemb.dims import DIMS
from dynemb.pipeline import Pipeline, eager_uncached, latest_version
from dynemb.repository import BuildOptions, build_repository
from dynemb.serving.runtime import OnnxRuntime
from dynemb.stages import RunnerOptions, load_runner
from dynemb.stages.llm_encoder import MINILM_LAYERS
from dynemb.stages.torch_stage import STAGE_ONNX, DeviceRunner
from dynemb.targets import GPU
from dynemb_client import build_inputs

EXPECT_GPU = os.environ.get("DYNEMB_EXPECT_GPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() and not EXPECT_GPU, reason="needs an NVIDIA GPU"
    ),
]
NEURAL = [name for name in stages.NAMES if stages.get(name).neural]
TOLERANCE = 1e-4  # fp32 on the GPU (TF32 off) vs the CPU, any output


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The gpu variant built from seeded weights of the trained model's shapes."""
    path = tmp_path_factory.mktemp("gpu") / "repo"
    build_repository(
        BuildOptions(
            repository=path,
            catalogue="synthetic",
            target=GPU,
            llm_layers=MINILM_LAYERS,
            pretrained=_pretrained_available(),
        )
    )
    return path


@pytest.fixture(scope="module")
def wire():
    """Probe users: an empty history, a short one, full windows with images."""
    histories = synthetic_with_images(30, seed=3)
    users = [[], histories.users[0][-3:], *histories.users]
    at = [histories.at[0], histories.at[0], *histories.at]
    return build_inputs(users, at, DIMS.max_events, DIMS.max_labels, top_k=10)


@pytest.fixture(scope="module")
def cpu(repo, wire):
    """Every tensor of the CPU fp32 pipeline (eager torch, uncached): the reference."""
    return Pipeline.from_repository(repo, eager_uncached()).run(wire, "recommend")


def on_gpu(precision: str, dlpack: bool = True) -> dict[str, RunnerOptions]:
    options = RunnerOptions(runtime="torch", device="cuda", precision=precision, dlpack=dlpack)
    return {name: options for name in NEURAL}


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.sum(got * want, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


@pytest.mark.parametrize("precision", sorted({"fp32", GPU.precision}))
def test_gpu_variant_embedding_matches_cpu_fp32_for_every_probe_user(repo, wire, cpu, precision):
    got = Pipeline.from_repository(repo, on_gpu(precision)).embed(wire)
    want = cpu["USER_EMBEDDING"]
    worst = cosines(got, want).min()
    assert worst >= COSINE_TARGET, f"{precision}: E_t cosine {worst:.6f} < {COSINE_TARGET}"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-3)
    if precision == "fp32":
        np.testing.assert_allclose(got, want, atol=TOLERANCE, rtol=0)


def test_tensors_stay_on_the_gpu_between_stages_and_recommend_agrees(repo, wire, cpu):
    tensors = Pipeline.from_repository(repo, on_gpu("fp32")).run(wire, "recommend")
    for name in ("TEXT_VEC", "IMAGE_VEC", "LABEL_VEC", "SEQ_FEATURES", "USER_EMBEDDING"):
        assert isinstance(tensors[name], torch.Tensor) and tensors[name].is_cuda, name
    same = (tensors["ITEM_IDS"] == cpu["ITEM_IDS"]).mean()
    assert same >= 0.9, f"only {same:.0%} of the top-10 items agree with the CPU"


@pytest.mark.parametrize("name", NEURAL)
def test_stage_onnx_on_cpu_matches_torch_on_the_gpu(repo, cpu, name):
    """The artifact NVIDIA's container serves (ONNX Runtime here, on the CPU) against the
    stage as the gpu variant runs it (torch on CUDA, fp32), batched and one user alone."""
    directory = latest_version(repo / name)
    runner = load_runner(directory, options=on_gpu("fp32", dlpack=False)[name])
    assert isinstance(runner, DeviceRunner) and runner.device.type == "cuda"
    step = {t.name: cpu[t.name] for t in runner.spec.inputs}
    output = runner.spec.outputs[0].name
    gpu = runner(step)[output]
    exported = OnnxRuntime(directory / STAGE_ONNX)
    np.testing.assert_allclose(exported(step), gpu, atol=TOLERANCE, rtol=0)
    alone = exported({k: v[2:3] for k, v in step.items()})
    np.testing.assert_allclose(alone[0], gpu[2], atol=TOLERANCE, rtol=0)


def test_a_large_batch_runs_and_equals_its_parts(repo, cpu):
    """1024 users (the variant's max batch) through the GPU stages at its precision:
    batched answers are the single-user ones (padding and masks do not leak)."""
    options = on_gpu(GPU.precision, dlpack=False)
    runners = {n: load_runner(latest_version(repo / n), options=options[n]) for n in NEURAL}
    rows = np.arange(GPU.max_batch_size) % len(cpu["EVENT_MASK"])
    tensors = {
        k: v[rows]
        for k, v in cpu.items()
        if isinstance(v, np.ndarray) and len(v) == len(cpu["EVENT_MASK"])
    }
    for name in NEURAL:
        step = {t.name: tensors[t.name] for t in runners[name].spec.inputs}
        tensors.update(runners[name](step))
    first = tensors["USER_EMBEDDING"][: len(cpu["EVENT_MASK"])]
    again = tensors["USER_EMBEDDING"][len(cpu["EVENT_MASK"]) : 2 * len(cpu["EVENT_MASK"])]
    assert np.isfinite(tensors["USER_EMBEDDING"]).all()
    assert cosines(first, again).min() >= COSINE_TARGET
    assert cosines(first, cpu["USER_EMBEDDING"]).min() >= COSINE_TARGET
