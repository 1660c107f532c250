"""The control token: environment, else a 0600 file; an open non-loopback server is refused."""

from __future__ import annotations

import stat
import subprocess
import sys
import threading

import pytest

from dynemb import control


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNEMB_CACHE", str(tmp_path))
    monkeypatch.delenv(control.TOKEN_ENV, raising=False)
    return tmp_path


def test_token_file_is_created_once_with_mode_0600(cache):
    assert control.load_token(create=False) is None
    token = control.load_token()
    path = cache / "control-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert control.load_token() == token and len(token) >= 32


def test_environment_wins(cache, monkeypatch):
    control.load_token()
    monkeypatch.setenv(control.TOKEN_ENV, "from-env")
    assert control.load_token() == "from-env"


def test_a_token_file_others_can_read_is_refused(cache):
    control.load_token()
    (cache / "control-token").chmod(0o644)
    with pytest.raises(control.ControlError, match="chmod 600"):
        control.load_token()


def test_server_args_protect_grpc_and_http():
    args = control.server_args("s3cret", "127.0.0.1")
    protected = "model-repository,logging,trace,shared-memory"
    assert f"--grpc-restricted-protocol={protected}:dynemb-control=s3cret" in args
    assert f"--http-restricted-api={protected}:dynemb-control=s3cret" in args
    assert control.headers("s3cret") == {"triton-grpc-protocol-dynemb-control": "s3cret"}


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.7", "example.org"])
def test_open_non_loopback_server_is_refused(host):
    with pytest.raises(control.ControlError, match="non-loopback"):
        control.server_args(None, host)
    assert control.server_args("tok", host)  # with a token it is allowed


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_may_run_open(host):
    assert control.server_args(None, host) == []


def test_token_with_separator_is_rejected():
    with pytest.raises(control.ControlError):
        control.server_args("a=b", "127.0.0.1")


def test_an_empty_token_protects_nothing_and_is_refused(cache):
    """A token file created but never written (a full disk, a crash) holds nothing."""
    (cache / "control-token").write_text("\n")
    (cache / "control-token").chmod(0o600)
    with pytest.raises(control.ControlError, match="no control token"):
        control.load_token()
    with pytest.raises(control.ControlError, match="empty"):
        control.server_args("", "127.0.0.1")
    assert not list(cache.glob("*.partial"))


# --- the repository's control lock ----------------------------------------------------


def hold_in_thread(path) -> tuple[threading.Event, threading.Thread]:
    """Another thread takes `path`'s control lock (held when this returns); set the event
    to let it go."""
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:
        with control.repository_lock(path, "the other holder"):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert holding.wait(10)
    return release, thread


def test_the_control_lock_has_one_holder_and_the_next_waits_for_it(tmp_path):
    release, thread = hold_in_thread(tmp_path)
    told: list[str] = []
    with (
        pytest.raises(control.ControlError, match="swap of text_rnn did not start"),
        control.repository_lock(tmp_path, "swap of text_rnn", 0.3, told.append),
    ):
        pytest.fail("taken while another thread holds it")
    assert len(told) == 1 and "waiting for another swap" in told[0]
    threading.Timer(0.2, release.set).start()
    with control.repository_lock(tmp_path, "swap of text_rnn", 10):  # once it lets go
        assert release.is_set()
    thread.join(10)


def test_a_holder_takes_the_control_lock_again_in_its_own_thread(tmp_path):
    taken = threading.Event()

    def other() -> None:
        with control.repository_lock(tmp_path, "the other", 10):
            taken.set()

    with control.repository_lock(tmp_path, "rolling swap", 0):
        with control.repository_lock(tmp_path, "its first replica's swap", 0):
            pass
        thread = threading.Thread(target=other, daemon=True)
        thread.start()
        assert not taken.wait(0.3)  # the inner exit did not let it go
    assert taken.wait(10)
    thread.join(10)


def test_the_control_lock_excludes_other_processes(tmp_path):
    """Another process holding an flock on the repository directory (`dynemb swap` beside
    `dynemb serve`) keeps the lock until it exits."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            str(tmp_path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(control.ControlError, match="still holds the control lock"),
            control.repository_lock(tmp_path, "recovery of llm_encoder", 0.3),
        ):
            pass
        holder.stdin.close()
        assert holder.wait(10) == 0
        with control.repository_lock(tmp_path, "recovery of llm_encoder", 10):
            pass
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_swap_waits_for_the_control_lock_and_installs_nothing_without_it(repo, tmp_path):
    from dynemb.pipeline import versions_of
    from dynemb.swap.candidates import make_candidate
    from dynemb.swap.swapper import Swapper

    candidate = make_candidate(repo, "label_mlp", tmp_path / "c")
    before = sorted(p.name for p in (repo / "label_mlp").iterdir())
    release, thread = hold_in_thread(repo)
    try:
        swapper = Swapper(repo, "127.0.0.1:9", lock_timeout_s=0.3)  # never reached
        told: list[str] = []
        with pytest.raises(control.ControlError, match="swap of label_mlp did not start"):
            swapper.swap("label_mlp", candidate, progress=told.append)
        assert any("waiting for another swap" in line for line in told)
        assert sorted(p.name for p in (repo / "label_mlp").iterdir()) == before
        assert versions_of(repo / "label_mlp") == [1]
    finally:
        release.set()
        thread.join(10)


def test_a_recovery_after_waiting_for_a_swap_skips_a_stage_the_swap_brought_back(tmp_path):
    """The supervisor saw a stage short of processes during a swap's handover; by the time
    the swap lets go of the lock the stage is healthy, and it is not reloaded again."""
    from types import SimpleNamespace

    from dynemb.supervisor import StageSupervisor

    supervisor = StageSupervisor.__new__(StageSupervisor)  # no server: only `recover`
    supervisor.server = SimpleNamespace(config=SimpleNamespace(repository=tmp_path))
    supervisor.interval_s, supervisor.lock_timeout_s = 0.05, 10.0
    reloaded: list[str] = []
    supervisor._recover = lambda stage, *_: reloaded.append(stage) or "recovered"
    supervisor._healthy = lambda stage: stage == "text_rnn"
    release, thread = hold_in_thread(tmp_path)
    threading.Timer(0.3, release.set).start()
    assert supervisor.recover("text_rnn", "a stage process died") is None
    thread.join(10)
    assert reloaded == []
    release, thread = hold_in_thread(tmp_path)
    threading.Timer(0.3, release.set).start()
    assert supervisor.recover("llm_encoder", "a stage process died") == "recovered"
    thread.join(10)
    assert reloaded == ["llm_encoder"]
    assert supervisor.recover("text_rnn", "probe: is not healthy") == "recovered"  # no wait
    supervisor.lock_timeout_s = 0.2
    release, thread = hold_in_thread(tmp_path)
    assert supervisor.recover("llm_encoder", "a stage process died") is None  # next round
    release.set()
    thread.join(10)
    assert reloaded == ["llm_encoder", "text_rnn"]
