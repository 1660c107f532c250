"""The control token: environment, else a 0600 file; an open non-loopback server is refused."""

from __future__ import annotations

import stat

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
