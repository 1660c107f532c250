"""Stage networks: batched equals single, padding never leaks into real events, masks work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynemb.dims import DIMS
from dynemb.joint import JointModel, JointParams
from dynemb.stages.preprocess.features import Preprocessor
from dynemb_client import Event, build_inputs

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def model(assets):
    return JointModel(DIMS, JointParams.default(len(assets.labels))).eval()


@pytest.fixture(scope="module")
def batch(assets, png):
    users = [
        [],
        [Event(T0, "one event", png, ["genre:Comedy"])],
        [Event(T0 + 60 * i, f"title {i}", png if i % 3 else None, ["rating:4"]) for i in range(12)],
        [Event(T0 + i, f"long {i}", None, ["genre:Drama"]) for i in range(DIMS.max_events + 5)],
    ]
    x = build_inputs(users, [None] * len(users), DIMS.max_events, DIMS.max_labels)
    pre = Preprocessor(assets)(x)
    return {k: torch.from_numpy(v) for k, v in pre.items()}


def _rows(x, i):
    return {k: v[i : i + 1] for k, v in x.items()}


@torch.inference_mode()
def test_user_embedding_batched_equals_single(model, batch):
    together = model.user_embedding(batch)
    assert together.shape == (4, DIMS.embed_dim)
    assert torch.isfinite(together).all()
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(4))
    for i in range(4):
        alone = model.user_embedding(_rows(batch, i))
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)


@torch.inference_mode()
def test_padding_content_does_not_change_real_outputs(model, batch):
    x = _rows(batch, 2)  # 12 real events
    noisy = {k: v.clone() for k, v in x.items()}
    noisy["TOKEN_IDS"][:, 12:] = 999
    noisy["TOKEN_COUNT"][:, 12:] = 3
    noisy["LABEL_IDS"][:, 12:] = 2
    noisy["TIME_FEATURES"][:, 12:] = 5.0
    torch.testing.assert_close(model.user_embedding(noisy), model.user_embedding(x))


@torch.inference_mode()
def test_missing_image_is_masked_not_black(model):
    cnn = model.stages["image_cnn"]
    pixels = torch.zeros((1, 2, 3, 32, 32), dtype=torch.uint8)  # both all black
    out = cnn(pixels, torch.tensor([[True, False]]))
    torch.testing.assert_close(out[0, 1], cnn.missing.detach())
    assert not torch.allclose(out[0, 0], out[0, 1])


@torch.inference_mode()
def test_text_rnn_reads_only_real_tokens(model):
    rnn = model.stages["text_rnn"]
    ids = torch.tensor([[[101, 2000, 0, 0], [101, 2000, 555, 777]]])
    out = rnn(ids, torch.tensor([[2, 2]]))  # second row: junk past its count
    torch.testing.assert_close(out[0, 0], out[0, 1])
    assert not rnn(ids, torch.tensor([[0, 2]]))[0, 0].any()  # no text -> zeros


@torch.inference_mode()
def test_embedding_moves_with_query_time(model, batch):
    x = _rows(batch, 2)
    later = {k: v.clone() for k, v in x.items()}
    later["QUERY_FEATURES"][:, 0] += 3.0
    later["TIME_FEATURES"][:, :, 0] += 3.0
    assert not torch.allclose(model.user_embedding(x), model.user_embedding(later))


def test_item_tower_ids_add_to_content(model):
    from dynemb.joint import ItemTower
    from dynemb.stages.llm_encoder.sentences import SENTENCE_DIM

    tower = ItemTower(DIMS, n_items=3)
    content = torch.randn(3, DIMS.event_dim)
    title = torch.randn(3, SENTENCE_DIM)
    for table in (tower.ids, tower.bias):
        torch.nn.init.normal_(table.weight[1:])
    torch.nn.init.normal_(tower.prior[1].weight)
    ids, none = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0])
    with_ids = tower(content, title, ids)
    content_only = tower(content, title, none)
    assert not torch.allclose(with_ids, content_only)
    # The title moves the vector, and the content prior gives an id-less item a bias.
    assert not torch.allclose(content_only, tower(content, torch.zeros_like(title), none))
    prior = tower.item_bias(content, title, none)
    assert prior.shape == (3,) and bool((prior != 0).all())
    torch.testing.assert_close(
        tower.item_bias(content, title, ids) - prior, tower.bias(ids)[:, 0], atol=1e-6, rtol=0
    )
    np.testing.assert_allclose(with_ids.norm(dim=-1).detach().numpy(), 1.0, rtol=1e-5)
