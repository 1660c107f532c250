"""`dynemb train --only STAGE`: only that stage moves; the result is a swappable version."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

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


def test_a_fine_tuned_stage_goes_where_a_candidate_may_and_is_checked_before_training(
    trained, tmp_path, monkeypatch
):
    """Into a served version it rewrote that version in place (the next reload served an
    unchecked stage); over any other folder it wrote into it. Both are refused before
    training starts; an earlier fine-tuned output is replaced whole, and a failure after
    training leaves it as it was."""
    import dynemb.training.stage as stage_module
    from dynemb.errors import UsageError

    data, path = trained
    repository = tmp_path / "repo"
    (repository / "label_mlp" / "1").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    ran = []
    monkeypatch.setattr(stage_module, "fit", lambda *a, **k: ran.append(1))
    for out in (repository / "label_mlp" / "1", repository, tmp_path / "mine"):
        with pytest.raises(UsageError, match=r"outside the model repository|not an earlier"):
            fine_tune_stage(data, path, "label_mlp", out, TINY, repository)
    assert not ran and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    monkeypatch.undo()

    real_fit, fitted = stage_module.fit, []

    def fit_once(*args, **kwargs):  # one training serves both calls below
        if not fitted:
            fitted.append(real_fit(*args, **kwargs))
        return fitted[0]

    monkeypatch.setattr(stage_module, "fit", fit_once)
    out = tmp_path / "candidate"
    fine_tune_stage(data, path, "label_mlp", out, TINY)
    first = (out / "weights.pt").read_bytes()
    monkeypatch.setattr(stage_module, "write_version", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fine_tune_stage(data, path, "label_mlp", out, TINY)  # an earlier candidate: allowed
    assert (out / "weights.pt").read_bytes() == first  # left as it was
    assert [p.name for p in tmp_path.iterdir() if "making" in p.name] == []


def test_a_checkpoint_path_is_checked_before_training_and_nothing_partial_stays(
    trained, tmp_path, monkeypatch
):
    from dynemb.checkpoint import CheckpointError, check_checkpoint_path

    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "folder", tmp_path / "file" / "model.pt"):
        with pytest.raises(CheckpointError):
            check_checkpoint_path(bad)
    check_checkpoint_path(tmp_path / "new" / "deeper" / "model.pt")  # folders are made

    checkpoint = Checkpoint.load(trained[1])

    def half_written(obj, path):
        Path(path).write_bytes(b"half")
        raise ZeroDivisionError  # as a full disk would, midway

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(ZeroDivisionError):
        checkpoint.save(tmp_path / "model.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
