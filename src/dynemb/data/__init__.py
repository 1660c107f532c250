"""Data sources: MovieLens-100k (from the recbole wheel), seeded synthetic data, JSON Lines."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dynemb.data.jsonl import DataError, load_events
from dynemb.data.movielens import fetch_ml100k, load_ml100k
from dynemb.data.synthetic import SyntheticConfig, generate
from dynemb.data.types import Dataset


def _movielens(cache_dir: Path) -> Dataset:
    return load_ml100k(fetch_ml100k(cache_dir))


def _synthetic(cache_dir: Path) -> Dataset:
    return generate(SyntheticConfig()).dataset


# Named data sets; anything else is read as a JSON Lines file of the user's own events.
LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "ml-100k": _movielens,
    "synthetic": _synthetic,
}


def load_dataset(name_or_path: str, cache_dir: Path) -> Dataset:
    """Load a named data set (fetched into `cache_dir` if needed) or a JSON Lines path."""
    loader = LOADERS.get(name_or_path)
    if loader is not None:
        return loader(Path(cache_dir))
    path = Path(name_or_path)
    if not path.is_file():
        if path.suffix or len(path.parts) > 1:  # meant as a file
            raise DataError(f"{name_or_path}: no such file")
        raise DataError(
            f"unknown data set {name_or_path!r}: not one of {', '.join(LOADERS)} "
            "and not an events file"
        )
    return load_events(path)


__all__ = ["LOADERS", "DataError", "Dataset", "load_dataset"]
