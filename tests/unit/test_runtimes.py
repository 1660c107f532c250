"""The optimised serving path computes what the plain eager one does: every torch stage
under ONNX Runtime against torch eager, batched and single, short and full histories;
the per-item caches change no output."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dynemb import stages
from dynemb.data.synthetic import draw_item_image
from dynemb.dims import DIMS
from dynemb.pipeline import Pipeline, eager_uncached
from dynemb.stages import RunnerOptions
from dynemb_client import Event, build_inputs

T0 = 1_700_000_000.0
TOLERANCE = 1e-4  # stated in the README: served/optimised vs eager, any output


def histories(seed: int = 0) -> list[list[Event]]:
    rng = random.Random(seed)
    users = []
    for n in (0, 1, 7, DIMS.max_events, DIMS.max_events + 5):
        users.append(
            [
                Event(
                    T0 + 600 * i,
                    f"{rng.choice(['red', 'blue', 'green'])} lamp {rng.randrange(12)}",
                    draw_item_image(i % 4, random.Random(i % 4), 32) if i % 3 == 0 else None,
                    [f"category:c{i % 6}", "rating:4"],
                )
                for i in range(n)
            ]
        )
    return users


@pytest.fixture(scope="module")
def inputs():
    users = histories()
    return build_inputs(users, [None] * len(users), DIMS.max_events, DIMS.max_labels, top_k=10)


@pytest.fixture(scope="module")
def eager(repo):
    return Pipeline.from_repository(repo, eager_uncached())


@pytest.fixture(scope="module")
def served(repo):
    return Pipeline.from_repository(repo)  # the stages' serving defaults


def test_the_serving_defaults_are_onnxruntime_with_caches(served):
    for name in stages.NAMES:
        runner = served.runners[name]
        if stages.trainable(name):
            assert runner.runtime.name == "onnxruntime", name
        assert runner.caches() or name in ("temporal_lstm", "llm_encoder", "retrieve"), name


@pytest.mark.parametrize("name", [n for n in stages.NAMES if stages.trainable(n)])
def test_each_stage_under_onnxruntime_matches_torch_eager(eager, served, inputs, name):
    """Fed the same inputs (the eager pipeline's tensors), batched and one user at a time."""
    tensors = eager.run(inputs, "recommend")
    spec = eager.runners[name].spec
    step = {t.name: tensors[t.name] for t in spec.inputs}
    want = eager.runners[name](step)
    got = served.runners[name](step)
    for output in spec.outputs:
        np.testing.assert_allclose(got[output.name], want[output.name], atol=TOLERANCE, rtol=0)
    for i in range(len(inputs["EVENT_COUNT"])):
        alone = served.runners[name]({k: v[i : i + 1] for k, v in step.items()})
        for output in spec.outputs:
            np.testing.assert_allclose(
                alone[output.name][0], want[output.name][i], atol=TOLERANCE, rtol=0
            )


def test_optimised_embedding_equals_eager_uncached(eager, served, inputs):
    want = eager.run(inputs, "recommend")
    for _ in range(2):  # the second pass is answered from the caches
        got = served.run(inputs, "recommend")
        assert np.abs(got["USER_EMBEDDING"] - want["USER_EMBEDDING"]).max() <= TOLERANCE
        np.testing.assert_array_equal(got["ITEM_IDS"], want["ITEM_IDS"])
    hits = {
        f"{name}/{cache}": c.stats().hits
        for name, runner in served.runners.items()
        for cache, c in runner.caches().items()
    }
    assert hits["text_rnn/text"] > 0 and hits["preprocess/texts"] > 0, hits
    assert hits["image_cnn/image"] > 0 and hits["label_mlp/labels"] > 0, hits


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_the_newest_only_encoder_equals_the_network(layers):
    """llm_encoder's export computes MiniLM's last layer for the newest token only: the
    same E_t as the network's forward for any depth, in one batch of histories from
    empty to full (padding last), before and after a training-like weight change."""
    import torch

    from dynemb.stages.llm_encoder import LLMEncoderParams, minilm_config
    from dynemb.stages.llm_encoder.network import LLMEncoder
    from dynemb.stages.llm_encoder.step import NewestEmbedding

    torch.manual_seed(layers)
    network = LLMEncoder(DIMS, LLMEncoderParams(minilm_config(layers))).eval()
    with torch.no_grad():  # move every weight off its initial value
        for parameter in network.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    users, n = 6, DIMS.max_events
    counts = torch.tensor([0, 1, 2, 17, n - 1, n])
    inputs = {
        t.name: torch.randn(users, *t.dims)
        for t in stages.get("llm_encoder").spec(DIMS).inputs
        if t.dtype == "FP32"
    }
    mask = torch.arange(n)[None, :] < counts[:, None]
    args = [*(inputs[k] for k in ("SEQ_FEATURES", "TEXT_VEC", "IMAGE_VEC", "LABEL_VEC")), mask]
    args.append(inputs["QUERY_FEATURES"])
    with torch.inference_mode():
        want = network(*args)
        got = NewestEmbedding.of(network)(*args)
    assert got.shape == want.shape == (users, DIMS.embed_dim)
    assert (got - want).abs().max().item() <= TOLERANCE


def test_a_short_batch_is_cut_and_equals_the_full_length_answer(repo, eager):
    """Sequence stages cut a batch to its longest history: two 3-event users alone give
    what they give beside a full one."""
    users = histories()[2:4]  # 7 events and a full window
    x = build_inputs(users, [None, None], DIMS.max_events, DIMS.max_labels)
    served = Pipeline.from_repository(repo)
    together = served.embed(x)
    alone = served.embed({k: v[:1] for k, v in x.items()})
    np.testing.assert_allclose(alone[0], together[0], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(together, eager.embed(x), atol=TOLERANCE, rtol=0)


def test_runtime_is_chosen_by_the_config_parameters(repo):
    from dynemb.pipeline import latest_version
    from dynemb.stages import load_runner

    directory = latest_version(repo / "temporal_lstm")
    assert load_runner(directory, parameters={"runtime": "torch"}).runtime.name == "torch"
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_runner(directory, options=RunnerOptions(runtime="tensorflow"))
