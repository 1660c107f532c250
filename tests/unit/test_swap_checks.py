"""Swap guards that need no server: signature, integrity, drift bounds, candidates."""

from __future__ import annotations

import numpy as np
import pytest

from dynemb.pipeline import Pipeline
from dynemb.stages import load_runner
from dynemb.swap.candidates import make_candidate
from dynemb.swap.drift import DriftReport, DriftThresholds, measure, probe_inputs
from dynemb.swap.swapper import SwapRefusedError, check_candidate
from dynemb_client.contract import RECOMMEND


def test_signature_change_is_refused(repo, tmp_path):
    candidate = make_candidate(repo, "text_rnn", tmp_path / "c", kind="signature")
    with pytest.raises(SwapRefusedError, match="signature differs"):
        check_candidate("text_rnn", candidate)


def test_wrong_stage_and_tampered_files_are_refused(repo, tmp_path):
    candidate = make_candidate(repo, "label_mlp", tmp_path / "c")
    with pytest.raises(SwapRefusedError, match="not 'text_rnn'"):
        check_candidate("text_rnn", candidate)
    (candidate / "weights.pt").write_bytes(b"tampered")
    with pytest.raises(SwapRefusedError, match="sha256"):
        check_candidate("label_mlp", candidate)
    with pytest.raises(SwapRefusedError, match="no manifest"):
        check_candidate("label_mlp", tmp_path)


def test_drift_of_a_small_perturbation_is_small_and_of_nan_is_flagged(repo, tmp_path):
    probes = probe_inputs(n_users=6)
    current = Pipeline.from_repository(repo)
    old = current.run(probes, RECOMMEND)

    def drift(kind: str, scale: float = 0.01) -> DriftReport:
        runner = load_runner(make_candidate(repo, "temporal_lstm", tmp_path / kind, kind, scale))
        new = Pipeline({**current.runners, "temporal_lstm": runner}).run(
            probes, RECOMMEND, checks=False
        )
        return measure(old, new, runner)

    small = drift("perturb")
    assert small.finite and small.embedding_cosine_mean > 0.99 and small.top10_overlap > 0.5
    assert not small.problems(DriftThresholds())
    same = measure(old, old, current.runners["temporal_lstm"])
    assert same.embedding_cosine_min == pytest.approx(1.0) and same.top10_overlap == 1.0
    nan = drift("nan")
    assert not nan.finite and any("NaN" in p for p in nan.problems(DriftThresholds()))


def test_probe_set_is_fixed():
    a, b = probe_inputs(n_users=3), probe_inputs(n_users=3)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["EVENT_COUNT"][-1, 0] == 0  # a cold-start user is among the probes


def test_a_full_disk_while_installing_leaves_nothing_half_written(repo, tmp_path, monkeypatch):
    """The swap's write of version N+1 fails part-way (ENOSPC): no version directory and no
    staging directory are left, so nothing half-written can ever be loaded."""
    import errno
    import shutil

    from dynemb.swap.swapper import Swapper

    repository = tmp_path / "repo"
    shutil.copytree(repo, repository)
    model_dir = repository / "label_mlp"
    candidate = make_candidate(repository, "label_mlp", tmp_path / "c")
    manifest = check_candidate("label_mlp", candidate)
    real_copy = shutil.copyfile
    written = []

    def copy_until_full(src, dst, *args, **kwargs):
        if written:  # the disk fills up after the first file
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        written.append(dst)
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copy_until_full)
    swapper = Swapper(repository, "127.0.0.1:1")  # no server is needed to install
    with pytest.raises(SwapRefusedError, match="nothing installed"):
        swapper._install(model_dir, candidate, manifest, 1, None, "")
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt"]


def test_a_stage_that_is_not_there_to_swap_or_roll_back_is_one_refusal(tmp_path):
    """Without versions, `rollback` (and every several---url swap) raised IndexError; a
    name that is no stage said "no such model folder"; a port past 65535 ran the drift
    probes and then reached port 34463 (gRPC's modulo)."""
    from dynemb.swap.rolling import RollingSwapper
    from dynemb.swap.swapper import Swapper, installed_versions
    from dynemb_client import ClientInputError

    (tmp_path / "label_mlp").mkdir()
    (tmp_path / "label_mlp" / "config.pbtxt").write_text("")
    with pytest.raises(SwapRefusedError, match="no versions; run `dynemb build`"):
        installed_versions(tmp_path, "label_mlp")
    with pytest.raises(SwapRefusedError, match="unknown stage 'bogus'"):
        installed_versions(tmp_path, "bogus")
    with pytest.raises(SwapRefusedError, match="unknown stage 'session'"):
        installed_versions(tmp_path, "session")  # a model, not a swappable stage
    with pytest.raises(SwapRefusedError, match="no versions"):
        Swapper(tmp_path, "127.0.0.1:1").rollback("label_mlp")
    with pytest.raises(SwapRefusedError, match="no versions"):
        RollingSwapper(tmp_path, ["127.0.0.1:1", "127.0.0.1:2"]).rollback("label_mlp")
    with pytest.raises(ClientInputError, match="host:port"):
        Swapper(tmp_path, "127.0.0.1:99999")


def test_a_repository_built_before_answers_carried_versions_is_verified_by_parity(tmp_path):
    """Its ensembles declare no <STAGE>_VERSION outputs (it serves on without them): the
    swap's check that the new version answers raised for every swap, which was then
    restored. Without versions, the answers' parity with the candidate decides."""
    from dynemb.swap.swapper import Swapper
    from dynemb_client import contract as wire

    want = {
        wire.USER_EMBEDDING: np.ones((2, 3), np.float32),
        wire.ITEM_SCORES: np.zeros((2, 4), np.float32),
    }

    class Answer:
        def __init__(self, version=None, shift=0.0):
            self.version, self.shift = version, shift

        def as_numpy(self, name):
            if name.endswith("_VERSION"):
                return None if self.version is None else np.full((2, 1), self.version)
            return want[name] + self.shift

    swapper = Swapper(tmp_path, "127.0.0.1:1")
    swapper._infer = lambda ensemble: Answer()
    swapper._verify("label_mlp", 2, want)  # no versions, same answers: verified
    swapper._infer = lambda ensemble: Answer(shift=1.0)
    with pytest.raises(RuntimeError, match="differs from the candidate"):
        swapper._verify("label_mlp", 2, want)
    swapper._infer = lambda ensemble: Answer(version=1)
    with pytest.raises(RuntimeError, match=r"versions \[1\], not v2"):
        swapper._verify("label_mlp", 2, want)


def test_a_server_that_is_down_is_said_before_the_drift_probes_run(repo, tmp_path, monkeypatch):
    """The probes load the whole pipeline and run it (seconds); a swap against a server
    that is not there ran them first."""
    from dynemb.swap.swapper import Swapper

    candidate = make_candidate(repo, "label_mlp", tmp_path / "c")
    swapper = Swapper(repo, "127.0.0.1:1")
    monkeypatch.setattr(swapper, "current_pipeline", lambda: pytest.fail("probes ran first"))
    with pytest.raises(SwapRefusedError, match=r"cannot reach the server at 127\.0\.0\.1:1"):
        swapper.swap("label_mlp", candidate)


def test_versions_say_which_stages_have_no_weights_and_a_skeleton_is_named(tmp_path):
    """preprocess (no weights) was listed "untrained" in a trained build; a candidate made
    from a skeleton (`dynemb configs`) named its staging folder as the culprit."""
    from dynemb.configs import write_configs
    from dynemb.dims import DIMS
    from dynemb.manifest import ManifestError
    from dynemb.swap.swapper import VersionInfo

    row = VersionInfo("preprocess", 1, True, False, "", "")
    assert row.state == "no weights"
    assert VersionInfo("text_rnn", 1, True, False, "", "").state == "untrained"
    assert VersionInfo("text_rnn", 1, True, True, "", "").state == "trained"

    write_configs(tmp_path / "skel", DIMS)
    with pytest.raises(ManifestError, match=r"skel/label_mlp/1: no manifest") as raised:
        make_candidate(tmp_path / "skel", "label_mlp", tmp_path / "c")
    assert ".making" not in str(raised.value)


def test_the_drift_cosine_of_a_non_finite_row_is_no_match():
    """A NaN row read as cosine 1.0: a NaN candidate's report said stage_cosine 1.0 and
    embedding cosines 1.0 (the swap was still refused, as not finite)."""
    from dynemb.swap.drift import _cosine

    a = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [2.0, 0.0]])
    b = np.array([[np.nan, 0.0], [np.inf, 1.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    got = _cosine(a, b)
    assert np.isnan(got[:2]).all() and got[2] == 1.0 and got[3] == 0.0 and got[4] == 1.0
