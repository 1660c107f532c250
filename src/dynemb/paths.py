"""Where things live: resolved from the working directory, never from where the package is
installed, so that a plain `pip install .` runs the same commands as a checkout.

Every command takes the model repository as an explicit `--repository`; its default is
`model_repository/` in the working directory (the checkout's own when run from its root).
Data, checkpoints, the server tree and logs go to `DYNEMB_CACHE`, by default
`.cache/dynemb/` in the working directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Relative on purpose: resolved against the working directory when used.
MODEL_REPOSITORY = Path("model_repository")
RESULTS_DIR = Path("benchmarks") / "results"
CACHE_ENV = "DYNEMB_CACHE"


def cache_dir() -> Path:
    """Data, checkpoints and the server tree; `DYNEMB_CACHE` overrides."""
    path = Path(os.environ.get(CACHE_ENV) or Path.cwd() / ".cache" / "dynemb")
    path.mkdir(parents=True, exist_ok=True)
    return path


# Written into a repository when `dynemb build` starts and removed when it has written
# every stage: a build cut short (Ctrl-C, a full disk) leaves stages of two builds side by
# side, which nothing may serve or read as one model.
UNFINISHED_BUILD = ".build-unfinished"


def unfinished_build(repository: Path) -> str | None:
    """Why `repository` must not be served or read (a build of it did not finish), or None."""
    marker = repository / UNFINISHED_BUILD
    if not marker.exists():
        return None
    return (
        f"{repository}: its last `dynemb build` did not finish ({marker} is there), so its "
        "stages may come from two builds; run the build again"
    )


@contextmanager
def made_beside(out: Path) -> Iterator[Path]:
    """A fresh staging folder beside `out` to make its new contents in; on a normal exit
    it replaces `out` (`replace_dir`), and whatever happens it is gone afterwards, so a
    failure or Ctrl-C leaves `out` as it was."""
    import shutil

    staging = out.with_name(f".{out.name}.making")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_dir(new: Path, out: Path) -> None:
    """Put the folder `new` in place of `out` (which may not exist yet): the old `out` is
    renamed aside, `new` renamed in, and only then the old one removed, so `out` is never
    half deleted; a failure or Ctrl-C between the renames puts the old one back."""
    import shutil

    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    had = out.exists()
    if had:
        out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        if had and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
