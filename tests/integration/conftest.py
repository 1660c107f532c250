"""One real tritonserver for the whole session: built repository, free loopback ports,
readiness poll, fail fast if the process dies, clean shutdown."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynemb.pipeline import Pipeline
from dynemb.repository import BuildOptions, build_repository
from dynemb.server import ServerConfig, TritonServer, free_port


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@dataclass
class LiveServer:
    config: ServerConfig
    server: TritonServer
    repository: Path
    token: str

    @property
    def url(self) -> str:
        return self.config.grpc_url


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A briefly trained model (2 epochs on the synthetic catalogue, ~30 s): the served
    answers are compared with PyTorch on trained weights, not only on initial ones."""
    from dynemb.data import load_dataset
    from dynemb.paths import cache_dir
    from dynemb.training.train import TrainOptions, train

    data = load_dataset("synthetic", cache_dir())
    checkpoint = train(data, TrainOptions(max_epochs=2, max_minutes=3.0, progress=False))
    path = tmp_path_factory.mktemp("checkpoint") / "synthetic.pt"
    checkpoint.save(path)
    return path


@pytest.fixture(scope="session")
def built_repository(tmp_path_factory, trained_checkpoint) -> Path:
    """The synthetic catalogue (it has images, so every branch is exercised), exported
    from the trained checkpoint."""
    path = tmp_path_factory.mktemp("model_repository")
    build_repository(
        BuildOptions(repository=path, catalogue="synthetic", checkpoint=trained_checkpoint, seed=0)
    )
    return path


@pytest.fixture(scope="session")
def live(built_repository, tmp_path_factory) -> LiveServer:
    config = ServerConfig(
        repository=built_repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path_factory.mktemp("logs") / "tritonserver.log",
        startup_timeout_s=240,
        control_token=secrets.token_urlsafe(16),
    )
    with TritonServer(config) as server:
        yield LiveServer(config, server, built_repository, config.control_token)
        assert server.running(), f"tritonserver died during the tests:\n{server.log_tail()}"


@pytest.fixture(scope="session")
def pipeline(built_repository) -> Pipeline:
    return Pipeline.from_repository(built_repository)
