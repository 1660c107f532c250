"""Fault injection against a real tritonserver, under load from the project's client with
its default retry policy: a killed stage process comes back by itself, a restarted
server loses no caller, a broken artifact fails start-up naming it."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from dynemb.bench.faults import Load, stub_pid
from dynemb.server import ServerConfig, ServerError, TritonServer, free_port
from dynemb.supervisor import StageSupervisor, stub_counts

RECOVERY_TARGET_S = 15.0


def server_config(repository, log_dir) -> ServerConfig:
    return ServerConfig(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=log_dir / "tritonserver-faults.log",
        startup_timeout_s=240,
        exit_timeout_s=10,
    )


@pytest.fixture(scope="module")
def supervised(built_repository, tmp_path_factory):
    """A second server on a copy of the repository, watched by the stage supervisor."""
    repository = tmp_path_factory.mktemp("faults") / "repository"
    shutil.copytree(built_repository, repository)
    config = server_config(repository, tmp_path_factory.mktemp("faults-logs"))
    with TritonServer(config) as server:
        supervisor = StageSupervisor(server, token=None, probe_every_s=2.0).start()
        yield server, supervisor
        supervisor.stop()


@pytest.mark.parametrize("stage", ["text_rnn", "llm_encoder"])
def test_a_killed_stage_comes_back_by_itself_and_no_call_fails(supervised, stage):
    server, supervisor = supervised
    before = len(supervisor.state.recoveries)
    with Load(server.config.grpc_url) as load:
        time.sleep(2)
        served_before = load.ok
        killed_at = time.time()
        os.kill(stub_pid(server, stage), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(supervisor.state.recoveries) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(supervisor.state.recoveries) > before, "the supervisor did not recover it"
        recovery = supervisor.state.recoveries[-1]
        back_at = recovery.detected_at + recovery.seconds
        time.sleep(2)
    assert recovery.stage == stage and recovery.ok, recovery
    assert back_at - killed_at <= RECOVERY_TARGET_S, (back_at - killed_at, recovery)
    assert not load.failures, load.failures[:3]
    assert set(load.raw_errors) <= {"INTERNAL", "NOT_FOUND"}  # what Triton itself answers
    assert load.ok > served_before  # it served again after the recovery
    outage = [ready for t, ready in load.readiness if killed_at + 1.5 < t < back_at - 0.2]
    assert outage and not all(outage), "readiness never said not ready during the outage"
    assert load.readiness[-1][1]  # ready again
    assert stub_counts(server.process.pid).get(stage, 0) >= 1


def test_a_restart_under_load_loses_no_caller(built_repository, tmp_path):
    """SIGTERM the server while clients call it, start it again on the same ports: the
    clients' default retry deadline carries every call across the gap."""
    config = server_config(built_repository, tmp_path)
    server = TritonServer(config)
    server.start()
    server.wait_ready()
    try:
        with Load(config.grpc_url) as load:
            time.sleep(2)
            stopped = time.monotonic()
            server.stop()
            shutdown_s = time.monotonic() - stopped
            started = time.monotonic()
            server = TritonServer(config)
            server.start()
            server.wait_ready()
            startup_s = time.monotonic() - started
            time.sleep(2)
        assert not load.failures, load.failures[:3]
        assert startup_s <= 20.0, startup_s
        assert shutdown_s + startup_s < 30.0  # inside the client's default retry deadline
        assert load.ok > 0
    finally:
        server.stop()


def test_a_broken_artifact_fails_start_up_naming_it(built_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(built_repository, repository)
    onnx = repository / "label_mlp" / "1" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])  # truncated on disk: the hash no longer fits
    server = TritonServer(server_config(repository, tmp_path))
    server.start()
    with pytest.raises(ServerError) as info:
        server.wait_ready()
    assert "label_mlp" in str(info.value) and "model.onnx" in str(info.value)
