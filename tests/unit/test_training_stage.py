"""`dynemb train --only STAGE`: only that stage moves; the result is a swappable version."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dynemb.checkpoint import Checkpoint
from dynemb.data.synthetic import SyntheticConfig, generate
from dynemb.evaluation.split import leave_one_out
from dynemb.manifest import Manifest
from dynemb.stages import load_runner
from dynemb.swap.swapper import check_candidate
from dynemb.training.stage import fine_tune_stage
from dynemb.training.train import TrainOptions, fit

TINY = TrainOptions(max_minutes=1.0, max_epochs=1, batch_size=8, llm_layers=1, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = generate(
        replace(
            SyntheticConfig(n_users=6, items_per_category=3, events_per_user=(8, 12)),
            n_categories=3,
        )
    ).dataset
    path = tmp_path_factory.mktemp("ck") / "model.pt"
    fit(data, leave_one_out(data), TINY).checkpoint(data).save(path)
    return data, path


def test_only_the_chosen_stage_changes(trained, tmp_path):
    data, path = trained
    before = Checkpoint.load(path).model
    after = fit(
        data, leave_one_out(data), replace(TINY, only="temporal_lstm", lr=1e-2), init=before
    ).model.joint
    for name, module in before.stages.items():
        changed = any(
            not torch.equal(a, b)
            for a, b in zip(
                module.state_dict().values(), after.stages[name].state_dict().values(), strict=True
            )
        )
        assert changed == (name == "temporal_lstm"), name
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            before.item_tower.state_dict().values(),
            after.item_tower.state_dict().values(),
            strict=True,
        )
    )


def test_fine_tuned_stage_is_a_swappable_version(trained, tmp_path):
    data, path = trained
    manifest = fine_tune_stage(data, path, "label_mlp", tmp_path / "v", TINY)
    assert manifest.trained and manifest.provenance.only == "label_mlp"
    assert manifest.provenance.valid_ndcg10 is not None
    assert manifest.hparams == Manifest.load(tmp_path / "v").hparams  # typed, round-trips
    check_candidate("label_mlp", tmp_path / "v")
    assert load_runner(tmp_path / "v").spec.name == "label_mlp"
    with pytest.raises(ValueError, match="torch stage"):
        fine_tune_stage(data, path, "retrieve", tmp_path / "r", TINY)
