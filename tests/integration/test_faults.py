"""Fault injection against a real tritonserver, under load from the project's client with
its default retry policy, through the same code as `dynemb bench-faults`: a killed stage
process comes back by itself, a restarted server loses no caller, a broken artifact fails
start-up naming it."""

from __future__ import annotations

import shutil

import pytest

from dynemb.bench.faults import crash, restart_run
from dynemb.pipeline import latest_version
from dynemb.server import ServerConfig, ServerError, TritonServer, free_port
from dynemb.supervisor import StageSupervisor, stub_counts

RECOVERY_TARGET_S = 15.0
STARTUP_TARGET_S = 20.0


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
    result = crash(server, supervisor, stage)
    assert result.ok and result.back_after_s <= RECOVERY_TARGET_S, result
    assert result.calls_failed == 0 and result.calls_ok > 0, result
    assert result.not_ready_seen, "readiness never said not ready during the outage"
    assert set(result.raw_errors) <= {"INTERNAL", "NOT_FOUND"}  # what Triton itself answers
    assert supervisor.state.recoveries[-1].stage == stage
    assert stub_counts(server.process.pid).get(stage, 0) >= 1


def test_a_restart_under_load_loses_no_caller(built_repository, tmp_path):
    """SIGTERM the server while clients call it, start it again on the same ports: the
    clients' default retry deadline carries every call across the gap."""
    config = server_config(built_repository, tmp_path)
    server = TritonServer(config)
    server.start()
    server.wait_ready()
    try:
        result, server = restart_run(server, config)
    finally:
        server.stop()
    assert result.calls_failed == 0 and result.calls_ok > 0, result
    assert result.startup_s <= STARTUP_TARGET_S, result
    assert result.shutdown_s + result.startup_s < 30.0  # inside the default retry deadline


def test_a_broken_artifact_fails_start_up_naming_it(built_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(built_repository, repository)
    onnx = latest_version(repository / "label_mlp") / "model.onnx"  # the one that serves
    onnx.write_bytes(onnx.read_bytes()[:100])  # truncated on disk: the hash no longer fits
    server = TritonServer(server_config(repository, tmp_path))
    server.start()
    try:
        with pytest.raises(ServerError) as info:
            server.wait_ready()
    finally:
        server.stop()  # a server that did come up must not outlive the test
    assert "label_mlp" in str(info.value) and "model.onnx" in str(info.value)
