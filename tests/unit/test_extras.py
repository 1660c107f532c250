"""A command that needs an optional extra says so in one line, before it starts: a plain
`pip install .` leaves them out, and a missing plot library ended a whole benchmark run
in a traceback."""

from __future__ import annotations

import importlib.util

import pytest

from dynemb import cli
from dynemb.errors import UsageError
from dynemb.extras import EXTRAS, extra_of, require


def test_a_missing_module_of_an_extra_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name)
    )
    with pytest.raises(UsageError, match=r"bench needs matplotlib .*pip install 'dynemb\[bench\]'"):
        require("bench", "bench")
    require("ray", "embed-all")  # installed here


def test_every_extra_module_is_installed_here_and_named_in_pyproject():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        named = {req.split("==")[0].split("[")[0] for req in extras[extra]}
        for module in modules:
            assert importlib.util.find_spec(module) is not None, module
            assert module in named, (extra, module)  # here, each distribution is its module
    assert extra_of("ray.data") == "ray" and extra_of("torch") is None and extra_of(None) is None


def test_a_late_import_of_a_missing_extra_is_one_line(monkeypatch, capsys):
    def app():
        raise ModuleNotFoundError("No module named 'pyarrow'", name="pyarrow")

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err == "dynemb: error: needs pyarrow: pip install 'dynemb[ray]'\n"
