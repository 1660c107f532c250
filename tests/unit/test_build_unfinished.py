"""A `dynemb build` cut short (Ctrl-C, a full disk) leaves stages of two builds side by
side: nothing serves or reads that repository until a build of it finishes. Nor is a
folder that holds no repository served."""

from __future__ import annotations

import pytest

from dynemb.paths import UNFINISHED_BUILD
from dynemb.pipeline import Pipeline, RepositoryError
from dynemb.repository import BuildOptions, build_repository
from dynemb.server import ServerConfig, ServerError, TritonServer


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
