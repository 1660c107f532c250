"""`dynemb serve` stops cleanly, stub processes included, on SIGTERM and on Ctrl-C."""

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
        assert process.poll() is None, process.stderr.read().decode()
        try:
            if client.is_server_ready() and client.is_model_ready("recommend"):
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    pytest.fail("dynemb serve did not get ready")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serve_stops_with_its_stubs(built_repository, tmp_path, sig):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dynemb.cli",
            "serve",
            "--repository",
            str(built_repository),
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
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_ready(f"127.0.0.1:{port}", 240, process)
        server_pid = int(subprocess.check_output(["pgrep", "-f", f"grpc-port={port}"]).split()[0])
        stubs = subprocess.run(["pgrep", "-g", str(server_pid)], capture_output=True, text=True)
        assert len(stubs.stdout.split()) >= 7  # server + one stub per stage
        process.send_signal(sig)
        # The server's own stop is bounded (exit timeout + 10 s, then SIGKILL); the rest is
        # the CLI's teardown, which took over 60 s once on a machine at load average ~6.
        assert process.wait(timeout=120) == 0
        deadline = time.monotonic() + 10
        while _group_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_alive(server_pid), "stub processes outlived the server"
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
