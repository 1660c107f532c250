"""Unit-tier fixtures."""

from __future__ import annotations

import pytest

from dynemb.repository import BuildOptions, build_repository


@pytest.fixture(scope="session")
def repo(tmp_path_factory):
    """A model repository built from the synthetic catalogue (seeded initial weights).
    Read-only for the tests that use it: candidates and copies go to their own tmp_path."""
    path = tmp_path_factory.mktemp("repo")
    build_repository(BuildOptions(repository=path, catalogue="synthetic"))
    return path
