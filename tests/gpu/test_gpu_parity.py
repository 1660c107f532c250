"""GPU tier: runs only where CUDA exists. The stages on the GPU agree with the CPU."""

from __future__ import annotations

import pytest
import torch

from dynemb.config import DIMS
from dynemb.features import Preprocessor
from dynemb.joint import JointModel
from dynemb_client import Event, build_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@torch.inference_mode()
def test_user_embedding_on_gpu_matches_cpu(assets, png):
    users = [
        [Event(1.7e9 + 60 * i, f"t{i}", png if i % 2 else None) for i in range(n)]
        for n in (0, 5, DIMS.max_events)
    ]
    x = build_inputs(users, [None] * 3, DIMS.max_events, DIMS.max_labels)
    pre = {k: torch.from_numpy(v) for k, v in Preprocessor(assets)(x).items()}
    model = JointModel(DIMS, len(assets.labels)).eval()
    cpu = model.user_embedding(pre)
    gpu = model.cuda().user_embedding({k: v.cuda() for k, v in pre.items()}).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=1e-4)
