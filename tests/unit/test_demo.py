"""`make demo` picks its checkpoint and rebuilds when the checkpoint is newer than the build."""

from __future__ import annotations

import os

import torch

from dynemb import demo, stages
from dynemb.paths import UNFINISHED_BUILD


def test_needs_build_follows_the_checkpoint(tmp_path):
    repository = tmp_path / "repo"
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"x")
    assert demo.needs_build(repository, checkpoint)  # nothing built yet
    for name in stages.NAMES[:-1]:
        (repository / name / "1").mkdir(parents=True)
        (repository / name / "1" / "manifest.json").write_text("{}")
    assert demo.needs_build(repository, None)  # one stage not built yet
    (repository / stages.NAMES[-1] / "1").mkdir(parents=True)
    (repository / stages.NAMES[-1] / "1" / "manifest.json").write_text("{}")
    os.utime(checkpoint, (1_000, 1_000))
    assert not demo.needs_build(repository, checkpoint)
    assert not demo.needs_build(repository, None)
    os.utime(checkpoint, (4_000_000_000, 4_000_000_000))  # retrained after the build
    assert demo.needs_build(repository, checkpoint)
    (repository / UNFINISHED_BUILD).write_text("")  # a build cut short
    assert demo.needs_build(repository, None)


def test_stale_checkpoints_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "cache_dir", lambda: tmp_path)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"format": 1}, tmp_path / "checkpoints" / "ml-100k.pt")
    said = []
    path, fresh = demo.demo_checkpoint("ml-100k", minutes=0, echo=said.append)
    assert (path, fresh) == (None, False)
    assert "retrain" in said[0]
