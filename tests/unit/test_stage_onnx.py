"""Every neural stage's stage-level ONNX (`stage.onnx`: the spec's tensors in, the spec's out,
a dynamic batch of users) computes what the stage computes: under ONNX Runtime (CPU) it
equals eager torch batched and one user at a time, and the served runner (per-row ONNX,
caches, the cut to the longest history) on the same inputs, within the README's 1e-4.
The inputs hold what goes wrong first in such exports: empty texts, events without an
image (the learned "no image" vector), padded events and an empty history."""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest

from dynemb import stages
from dynemb.data.synthetic import draw_item_image
from dynemb.dims import DIMS
from dynemb.pipeline import Pipeline, eager_uncached, latest_version
from dynemb.serving.runtime import OnnxRuntime
from dynemb.stages.torch_stage import STAGE_ONNX
from dynemb.targets import TRITON_CONTAINER
from dynemb_client import Event, build_inputs

T0 = 1_700_000_000.0
TOLERANCE = 1e-4  # stated in the README: any exported or served output vs eager torch
NEURAL = [name for name in stages.NAMES if stages.get(name).neural]


def users() -> list[list[Event]]:
    """An empty history, a short one with an empty text, a full window with every third
    event imageless, and a history longer than the window."""
    rng = random.Random(0)

    def event(i: int, text: str | None = None) -> Event:
        image = draw_item_image(i % 4, random.Random(i % 4), 32) if i % 3 else None
        text = f"{rng.choice(['red', 'blue'])} lamp {i}" if text is None else text
        return Event(T0 + 600 * i, text, image, [f"category:c{i % 6}", "rating:4"])

    return [
        [],
        [event(0, ""), event(1), event(2, "")],
        [event(i) for i in range(DIMS.max_events)],
        [event(i) for i in range(DIMS.max_events + 7)],
    ]


@pytest.fixture(scope="module")
def tensors(repo):
    """Every tensor of the ensemble for the users, from the plain eager pipeline."""
    histories = users()
    x = build_inputs(histories, [None] * len(histories), DIMS.max_events, DIMS.max_labels, 10)
    return Pipeline.from_repository(repo, eager_uncached()).run(x, "recommend")


@pytest.fixture(scope="module")
def served(repo):
    return Pipeline.from_repository(repo)  # the serving defaults: per-row ONNX, caches


def test_the_inputs_hold_empty_texts_missing_images_and_padding(tensors):
    real = tensors["EVENT_MASK"]
    assert (real & (tensors["TOKEN_COUNT"] == 0)).any(), "no real event with an empty text"
    assert (real & ~tensors["IMAGE_MASK"]).any(), "no real event without an image"
    assert (~real).any() and (real.sum(1) == 0).any(), "no padding or no empty history"


def eager_stage(repo, name: str):
    """The stage-level function in eager torch, from the version's weights."""
    import torch

    from dynemb.manifest import Manifest

    directory = latest_version(repo / name)
    manifest = Manifest.load(directory)
    stage = stages.get(name)
    function = stage.stage_function(stage.load_network(directory, manifest))

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        args = [torch.from_numpy(inputs[t.name]) for t in stage.spec(DIMS).inputs]
        with torch.inference_mode():
            return function(*args).numpy()

    return run


@pytest.mark.parametrize("name", NEURAL)
def test_stage_onnx_equals_eager_torch_batched_and_single(repo, tensors, name):
    spec = stages.get(name).spec(DIMS)
    step = {t.name: tensors[t.name] for t in spec.inputs}
    want = eager_stage(repo, name)(step)
    exported = OnnxRuntime(latest_version(repo / name) / STAGE_ONNX)
    np.testing.assert_allclose(exported(step), want, atol=TOLERANCE, rtol=0)
    for i in range(len(want)):
        alone = exported({k: v[i : i + 1] for k, v in step.items()})
        np.testing.assert_allclose(alone[0], want[i], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", NEURAL)
def test_stage_onnx_equals_the_served_runner(repo, tensors, served, name):
    """What a native model in NVIDIA's container would answer is what the Python stage
    answers today, caches and cuts included (twice: the second from the caches)."""
    runner = served.runners[name]
    step = {t.name: tensors[t.name] for t in runner.spec.inputs}
    exported = OnnxRuntime(latest_version(repo / name) / STAGE_ONNX)(step)
    for _ in range(2):
        out = runner.trim(step, runner(step))[runner.spec.outputs[0].name]
        np.testing.assert_allclose(exported, out, atol=TOLERANCE, rtol=0)


def test_no_image_events_get_the_learned_vector_not_a_black_picture(repo, tensors):
    step = {"IMAGE_PIXELS": tensors["IMAGE_PIXELS"], "IMAGE_MASK": tensors["IMAGE_MASK"]}
    out = OnnxRuntime(latest_version(repo / "image_cnn") / STAGE_ONNX)(step)
    missing = ~step["IMAGE_MASK"]
    rows = out[missing]
    np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), atol=1e-6)
    black = dict(step, IMAGE_MASK=np.ones_like(step["IMAGE_MASK"]))
    assert (
        np.abs(
            OnnxRuntime(latest_version(repo / "image_cnn") / STAGE_ONNX)(black)[missing] - rows
        ).max()
        > 1e-3
    ), "an imageless event reads as a black picture"


_ONNX_DTYPES = {
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT: "FP32",
}


def onnx_signature(path) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, dims) of a model's graph inputs and outputs; a symbolic dim is -1."""
    graph = onnx.load(str(path), load_external_data=False).graph
    found = {}
    for value in (*graph.input, *graph.output):
        t = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        found[value.name] = (_ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), dims)
    return found


@pytest.mark.parametrize("name", NEURAL)
def test_stage_onnx_has_the_spec_signature_and_the_container_config_fits_it(repo, name):
    """Names, dtypes and dims with a dynamic batch: what the triton-container variant's
    config declares for the native model is what its ONNX reads and writes (Triton's
    onnxruntime backend refuses a model whose config disagrees)."""
    from dynemb.configs import stage_config

    found = onnx_signature(latest_version(repo / name) / STAGE_ONNX)
    spec = TRITON_CONTAINER.stage_spec(stages.get(name), DIMS)
    config = stage_config(spec)
    declared = {io.name: (io.data_type, (-1, *io.dims)) for io in (*config.input, *config.output)}
    assert set(found) == set(declared), f"{name}: ONNX {sorted(found)} vs config {sorted(declared)}"
    from dynemb.configs import _DTYPES

    for tensor in (*spec.inputs, *spec.outputs):
        dtype, dims = found[tensor.name]
        assert dtype == tensor.dtype, f"{name}.{tensor.name}: ONNX {dtype}, spec {tensor.dtype}"
        assert dims == (-1, *tensor.dims), f"{name}.{tensor.name}: ONNX dims {dims}"
        assert declared[tensor.name] == (_DTYPES[tensor.dtype], dims)


def test_the_manifest_hashes_the_stage_onnx(repo):
    from dynemb.manifest import Manifest

    for name in NEURAL:
        directory = latest_version(repo / name)
        assert STAGE_ONNX in Manifest.load(directory).files, name
