"""`dynemb candidate` writes outside the repository and never over what is not a candidate."""

from __future__ import annotations

import shutil

import pytest

from dynemb.errors import UsageError
from dynemb.manifest import Manifest
from dynemb.swap.candidates import make_candidate


def test_a_candidate_never_replaces_the_repository_or_a_folder_of_its_own(repo, tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    serving = copy / "label_mlp" / "1"
    for out in (serving, copy, copy / "label_mlp" / "2", tmp_path):
        with pytest.raises(UsageError):
            make_candidate(copy, "label_mlp", out)
    assert Manifest.load(serving).provenance.candidate is None  # untouched
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="not an earlier candidate"):
        make_candidate(copy, "label_mlp", mine)
    assert (mine / "keep.txt").read_text() == "mine"
    out = tmp_path / "cand"
    for kind in ("perturb", "reinit"):  # the second replaces the first
        made = make_candidate(copy, "label_mlp", out, kind=kind)
        assert Manifest.load(made).provenance.candidate == kind
    assert not list(tmp_path.glob(".*making"))
