"""The optional extras some commands need (pyproject.toml's [project.optional-dependencies]),
checked before a command starts: a plain `pip install .` leaves them out, and a missing
one surfaced as a traceback, after a whole benchmark had run when it was the plot's."""

from __future__ import annotations

import importlib.util

from dynemb.errors import UsageError

# extra -> the modules of it the commands import
EXTRAS: dict[str, tuple[str, ...]] = {
    "bench": ("fastapi", "uvicorn", "httpx", "matplotlib", "hypothesis"),
    "ray": ("ray", "pandas", "pyarrow"),
}


def require(extra: str, command: str, modules: tuple[str, ...] | None = None) -> None:
    """UsageError naming the install command if a module of `extra` that `command` uses
    (`modules`; default: all of the extra's) is missing."""
    missing = [m for m in modules or EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(
            f"{command} needs {', '.join(missing)} (the '{extra}' extra): "
            f"pip install 'dynemb[{extra}]'"
        )


def extra_of(module: str | None) -> str | None:
    """The extra a missing top-level module belongs to, if any."""
    top = (module or "").split(".")[0]
    return next((extra for extra, modules in EXTRAS.items() if top in modules), None)
