"""`dynemb serve` stops cleanly, stub processes included, on SIGTERM and on Ctrl-C, and
starts its tritonserver again when it dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import tritonclient.grpc as grpcclient

from dynemb.server import ServerConfig, ServerError, TritonServer, free_port


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_ready(url: str, timeout_s: float, process: subprocess.Popen) -> None:
    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "dynemb serve exited"
        try:
            if client.is_server_ready() and client.is_model_ready("recommend"):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail("dynemb serve did not get ready")


def _serve(repository, tmp_path) -> tuple[subprocess.Popen, int]:
    """`dynemb serve` on free ports, and its gRPC port; what it says goes to said.txt."""
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynemb.cli",
            "serve",
            "--repository",
            str(repository),
            "--grpc-port",
            str(port),
            "--http-port",
            str(free_port()),
            "--metrics-port",
            str(free_port()),
            "--supervisor-port",
            str(free_port()),
            "--log-file",
            str(tmp_path / "serve.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "said.txt").open("wb"),
    )
    return process, port


def _wait_said(tmp_path, text: str, count: int, process: subprocess.Popen) -> str:
    """What `dynemb serve` said, once it has said `text` `count` times (it is serving)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        said = (tmp_path / "said.txt").read_text(errors="replace")
        if said.count(text) >= count:
            return said
        assert process.poll() is None, said
        time.sleep(0.5)
    pytest.fail(f"dynemb serve did not say {text!r} {count} time(s)")


def _server_pid(port: int) -> int:
    return int(subprocess.check_output(["pgrep", "-f", f"grpc-port={port}"]).split()[0])


def _stop(process: subprocess.Popen, sig: int = signal.SIGTERM) -> int:
    process.send_signal(sig)
    # The server's own stop is bounded (exit timeout + 10 s, then SIGKILL); the rest is
    # the CLI's teardown, which took over 60 s once on a machine at load average ~6.
    return process.wait(timeout=120)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serve_stops_with_its_stubs(built_repository, tmp_path, sig):
    process, port = _serve(built_repository, tmp_path)
    try:
        _wait_said(tmp_path, "Ctrl-C to stop", 1, process)
        _wait_ready(f"127.0.0.1:{port}", 10, process)
        server_pid = _server_pid(port)
        stubs = subprocess.run(["pgrep", "-g", str(server_pid)], capture_output=True, text=True)
        assert len(stubs.stdout.split()) >= 7  # server + one stub per stage
        assert _stop(process, sig) == 0
        deadline = time.monotonic() + 10
        while _group_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(server_pid), "stub processes outlived the server"
    finally:
        if process.poll() is None:
            process.kill()


def test_cli_serve_starts_a_dead_server_again(built_repository, tmp_path):
    """tritonserver 2.51 dies of SIGSEGV when a client cancels an ensemble call in flight
    (dynemb.cluster.RestartBudget); with one replica `dynemb serve` used to exit with it,
    leaving no server. A SIGKILL stands in for the crash here: the same exit, on cue."""
    process, port = _serve(built_repository, tmp_path)
    try:
        _wait_said(tmp_path, "Ctrl-C to stop", 1, process)  # serving, as it says
        first = _server_pid(port)
        os.kill(first, signal.SIGKILL)
        said = _wait_said(tmp_path, "again", 2, process)  # "starting ... again", "serving ..."
        assert "exited (killed by SIGKILL)" in said, said
        _wait_ready(f"127.0.0.1:{port}", 10, process)
        assert _server_pid(port) != first
        assert _stop(process) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_start_fails_fast_when_the_server_dies(tmp_path):
    broken = tmp_path / "repo"
    (broken / "preprocess" / "1").mkdir(parents=True)
    (broken / "preprocess" / "config.pbtxt").write_text("this is not a config")
    config = ServerConfig(
        repository=broken,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        models=("preprocess",),
        log_file=tmp_path / "log",
        startup_timeout_s=120,
    )
    started = time.monotonic()
    with pytest.raises(ServerError), TritonServer(config):
        pass
    assert time.monotonic() - started < 60
