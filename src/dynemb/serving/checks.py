"""Checks a stage runs on one request's tensors before the request joins a batch: any
client can call an internal stage directly, so each stage defends itself. Each raises
InputError naming the tensor and the first offending element.

A GPU stage's float inputs may be torch tensors on the device (DLPack): `finite` checks
those where they are and copies only a bad one to the host to name the element."""

from __future__ import annotations

import numpy as np

from dynemb.errors import InputError
from dynemb.serving.arrays import all_finite, to_numpy


def _where(name: str, bad: np.ndarray) -> str:
    index = np.argwhere(bad)[0]
    return name + "".join(f"[{i}]" for i in index)


def in_range(name: str, values: np.ndarray, low: int, high: int) -> None:
    """Integers in [low, high)."""
    values = to_numpy(values)
    bad = (values < low) | (values >= high)
    if bad.any():
        where = _where(name, bad)
        raise InputError(where, f"{values[bad][0]} is not in [{low}, {high})")


def finite(name: str, values: np.ndarray) -> None:
    if all_finite(values):
        return
    values = to_numpy(values)
    bad = ~np.isfinite(values)
    if bad.any():
        raise InputError(_where(name, bad), f"must be finite, got {values[bad][0]}")


def bounded(name: str, values: np.ndarray, limit: float) -> None:
    """Finite, and within [-limit, limit]: a finite float near float32's largest made the
    stage's own output overflow, which it then reported as its failure (INTERNAL)."""
    finite(name, values)
    values = to_numpy(values)
    bad = np.abs(values) > limit
    if bad.any():
        raise InputError(_where(name, bad), f"must be within ±{limit:g}, got {values[bad][0]}")


def prefix_mask(name: str, mask: np.ndarray) -> None:
    """Each row's True entries come first: real events, then padding."""
    mask = to_numpy(mask)
    rows = mask.reshape(len(mask), -1)
    counts = rows.sum(axis=1)
    expected = np.arange(rows.shape[1])[None, :] < counts[:, None]
    bad = rows != expected
    if bad.any():
        raise InputError(_where(name, bad), "real events must come first, then padding")
