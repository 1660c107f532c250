"""A `dynemb build` cut short (Ctrl-C, a full disk) leaves stages of two builds side by
side: nothing serves or reads that repository until a build of it finishes. Nor is a
folder that holds no repository served, nor a repository on ports already taken."""

from __future__ import annotations

import socket

import pytest

from dynemb.paths import UNFINISHED_BUILD
from dynemb.pipeline import Pipeline, RepositoryError
from dynemb.repository import BuildOptions, build_repository
from dynemb.server import ServerConfig, ServerError, TritonServer, free_port


def test_a_build_cut_short_is_refused_until_one_finishes(repo, tmp_path):
    def cut_after_two(names):
        for i, name in enumerate(names):
            if i == 2:
                raise KeyboardInterrupt
            yield name

    options = BuildOptions(repository=tmp_path / "repo", catalogue="synthetic")
    with pytest.raises(KeyboardInterrupt):
        build_repository(options, progress=cut_after_two)
    with pytest.raises(RepositoryError, match="did not finish"):
        Pipeline.from_repository(options.repository)
    server = TritonServer(ServerConfig(repository=options.repository, log_file=tmp_path / "log"))
    with pytest.raises(ServerError, match="did not finish"):
        server.start()
    assert server.process is None  # nothing was started
    # A build that finished (the unit tier's own repository) leaves no marker.
    assert not (repo / UNFINISHED_BUILD).exists()
    Pipeline.from_repository(repo)


def test_a_folder_that_is_not_a_repository_is_refused_before_tritonserver_starts(tmp_path):
    """tritonserver itself would start and die with 'failed to stat file'."""
    for folder in (tmp_path / "missing", tmp_path):
        server = TritonServer(ServerConfig(repository=folder, log_file=tmp_path / "log"))
        with pytest.raises(ServerError, match=r"not a dynemb model repository \(no preprocess"):
            server.start()
        assert server.process is None


def test_ports_already_taken_are_refused_before_tritonserver_starts(repo, tmp_path):
    """tritonserver itself would load every model (20 s here) and then die, the reason in
    its log."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        config = ServerConfig(
            repository=repo,
            grpc_port=free_port(),
            http_port=taken,
            metrics_port=free_port(),
            log_file=tmp_path / "log",
        )
        server = TritonServer(config)
        with pytest.raises(ServerError, match=rf"HTTP port {taken} already in use"):
            server.start()
        assert server.process is None


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"grpc_port": -1}, "gRPC port -1 is not in 1-65535"),  # an OverflowError traceback
        ({"host": "192.0.2.1"}, "192.0.2.1: not an address of this machine"),  # "in use"
        ({"host": "nonexistent.invalid"}, "cannot resolve the host"),  # "in use" too
    ],
)
def test_ports_that_cannot_be_bound_say_why_before_tritonserver_starts(
    repo, tmp_path, changes, said
):
    config = ServerConfig(repository=repo, log_file=tmp_path / "log", **changes)
    server = TritonServer(config)
    with pytest.raises(ServerError, match=said) as raised:
        server.start()
    assert "already in use" not in str(raised.value) and server.process is None
