"""GPU tier: runs where CUDA exists, and fails if parity with the CPU breaks.

On a GPU host, `make install` takes the pinned torch from PyPI, whose Linux wheels are
CUDA builds (only this project's CPU machines carry a CPU-only wheel on disk), and
`make test-gpu` runs this tier. Set DYNEMB_EXPECT_GPU=1 there: then a torch that cannot
see the GPU fails the tier instead of skipping it.
"""

from __future__ import annotations

import os

import pytest
import torch

from dynemb import stages
from dynemb.dims import DIMS
from dynemb.joint import JointModel, JointParams
from dynemb.stages.preprocess.features import Preprocessor
from dynemb_client import Event, build_inputs

EXPECT_GPU = os.environ.get("DYNEMB_EXPECT_GPU") == "1"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() and not EXPECT_GPU, reason="needs an NVIDIA GPU"
    ),
]


def test_the_gpu_is_visible():
    assert torch.cuda.is_available(), (
        f"DYNEMB_EXPECT_GPU=1 but torch {torch.__version__} sees no GPU"
    )


@pytest.fixture(scope="module")
def preprocessed(assets, png):
    users = [
        [Event(1.7e9 + 60 * i, f"t{i}", png if i % 2 else None) for i in range(n)]
        for n in (0, 5, DIMS.max_events)
    ]
    x = build_inputs(users, [None] * 3, DIMS.max_events, DIMS.max_labels)
    return {k: torch.from_numpy(v) for k, v in Preprocessor(assets)(x).items()}


@torch.inference_mode()
def test_user_embedding_on_gpu_matches_cpu(assets, preprocessed):
    model = JointModel(DIMS, JointParams.default(len(assets.labels))).eval()
    cpu = model.user_embedding(preprocessed)
    gpu = model.cuda().user_embedding({k: v.cuda() for k, v in preprocessed.items()}).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("name", [n for n in stages.NAMES if stages.trainable(n)])
def test_each_torch_stage_on_gpu_matches_cpu(assets, preprocessed, name):
    """Each served network alone, fed its spec's inputs (the CPU pipeline's tensors)."""
    model = JointModel(DIMS, JointParams.default(len(assets.labels))).eval()
    tensors = dict(preprocessed)
    s = model.stages
    tensors["TEXT_VEC"] = s["text_rnn"](tensors["TOKEN_IDS"], tensors["TOKEN_COUNT"])
    tensors["IMAGE_VEC"] = s["image_cnn"](tensors["IMAGE_PIXELS"], tensors["IMAGE_MASK"])
    tensors["LABEL_VEC"] = s["label_mlp"](tensors["LABEL_IDS"])
    tensors["SEQ_FEATURES"] = s["temporal_lstm"](
        *(tensors[n] for n in ("TEXT_VEC", "IMAGE_VEC", "LABEL_VEC", "TIME_FEATURES", "EVENT_MASK"))
    )
    spec = stages.get(name).spec(DIMS)
    inputs = [tensors[t.name] for t in spec.inputs]
    network = s[name]
    cpu = network(*inputs)
    gpu = network.cuda()(*(t.cuda() for t in inputs)).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
