"""Malformed requests for every model, for the fault-injection tests and benchmark.

`malformed(draw, ...)` is a hypothesis strategy that takes one good request of a model and
breaks one of its input tensors in one way that model must refuse: a wrong dtype or shape,
a missing tensor, an id or count out of range, NaN or inf, a mask that is not a prefix,
non-UTF-8 text, a garbage, truncated or oversized image, a decompression bomb, text over
the limit, decreasing or impossible times, users of one request asking for different k.
Each case says which tensor the refusal must name.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from dynemb.specs import TensorSpec
from dynemb.stages.preprocess.features import MAX_TEXT_BYTES
from dynemb_client import contract as wire


@dataclass(frozen=True)
class Malformed:
    model: str
    inputs: dict[str, np.ndarray]
    field: str  # the tensor the error must name
    how: str


@dataclass(frozen=True)
class Ranges:
    """The valid integer ranges [low, high) of the tensors that carry ids or counts."""

    by_tensor: Mapping[str, tuple[int, int]]

    @classmethod
    def of(cls, vocab_size: int, n_labels: int, max_tokens: int, max_events: int, max_k: int):
        return cls(
            {
                "TOKEN_IDS": (0, vocab_size),
                "TOKEN_COUNT": (0, max_tokens + 1),
                "LABEL_IDS": (0, n_labels),
                wire.EVENT_COUNT: (0, max_events + 1),
                wire.TOP_K: (1, max_k + 1),
            }
        )


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares width x height pixels."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _kinds(tensor: TensorSpec, ranges: Ranges, good: dict[str, np.ndarray]) -> list[str]:
    kinds = ["dtype", "shape", "missing"]
    name = tensor.name
    if name in ranges.by_tensor:
        kinds += ["below", "above"]
    if tensor.dtype == "FP32":
        kinds += ["nan", "inf"]
    if name == "EVENT_MASK":
        kinds.append("not a prefix")
    if name in (wire.EVENT_TIME, wire.QUERY_TIME):
        kinds += ["nan", "negative", "overflow"]
    count = int(good[wire.EVENT_COUNT].min()) if wire.EVENT_COUNT in good else 0
    if name == wire.EVENT_TIME and count >= 2:
        kinds.append("decreasing")
    if name in (wire.EVENT_TEXT, wire.EVENT_LABELS) and count >= 1:
        kinds.append("not UTF-8")
    if name == wire.EVENT_TEXT and count >= 1:
        kinds.append("text over the limit")
    if name == wire.EVENT_IMAGE and count >= 1:
        kinds += ["garbage image", "truncated image", "decompression bomb"]
    if name == wire.TOP_K and len(good[name]) >= 2:
        kinds.append("users ask for different k")
    return kinds


@st.composite
def malformed(
    draw: st.DrawFn,
    model: str,
    spec_inputs: tuple[TensorSpec, ...],
    good: dict[str, np.ndarray],
    ranges: Ranges,
) -> Malformed:
    """One good request of `model` with one tensor broken in one way."""
    tensor = draw(st.sampled_from(spec_inputs))
    kind = draw(st.sampled_from(_kinds(tensor, ranges, good)))
    inputs = {name: np.array(value, copy=True) for name, value in good.items()}
    name = tensor.name
    value = inputs[name]
    users = len(value)
    count = int(good[wire.EVENT_COUNT].min()) if wire.EVENT_COUNT in good else 0
    user = draw(st.integers(0, users - 1))

    def position(limit: int | None = None) -> tuple[int, ...]:
        """A random element index of `value` for user `user` (events below `limit`)."""
        index = [user]
        for axis, size in enumerate(value.shape[1:]):
            top = min(size, limit) if axis == 0 and limit is not None else size
            index.append(draw(st.integers(0, max(top - 1, 0))))
        return tuple(index)

    if kind == "dtype":
        inputs[name] = (
            np.zeros(value.shape, np.float32)
            if tensor.dtype != "FP32"
            else value.astype(np.float64)
        )
    elif kind == "shape":
        if value.ndim > 1 and draw(st.booleans()):
            inputs[name] = value[:, : max(value.shape[1] - 1, 0)]  # one element short
        else:
            inputs[name] = value[..., None]  # one axis too many
    elif kind == "missing":
        del inputs[name]
    elif kind in ("below", "above"):
        low, high = ranges.by_tensor[name]
        inputs[name][position()] = low - 1 if kind == "below" else high
    elif kind == "nan":
        inputs[name][position(count if name == wire.EVENT_TIME else None)] = np.nan
    elif kind == "inf":
        inputs[name][position()] = np.inf
    elif kind == "negative":
        inputs[name][position(count if name == wire.EVENT_TIME else None)] = -1.0
    elif kind == "overflow":
        inputs[name][position(count if name == wire.EVENT_TIME else None)] = 1e12
    elif kind == "decreasing":
        i = draw(st.integers(1, count - 1))
        inputs[name][user, i] = inputs[name][user, i - 1] - 3600.0
    elif kind == "not a prefix":
        row = inputs[name][user]
        row[:] = False
        row[-1] = True  # the only real event after padding
    elif kind == "not UTF-8":
        inputs[name][position(count)] = b"\xff\xfe broken"
    elif kind == "text over the limit":
        inputs[name][position(count)] = b"x" * (MAX_TEXT_BYTES + 1)
    elif kind == "garbage image":
        inputs[name][position(count)] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
    elif kind == "truncated image":
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
        inputs[name][position(count)] = buffer.getvalue()[:60]
    elif kind == "decompression bomb":
        inputs[name][position(count)] = png_bomb()
    elif kind == "users ask for different k":
        low, high = ranges.by_tensor[name]
        inputs[name][:, 0] = low
        inputs[name][-1, 0] = min(low + 1, high - 1)
    else:  # pragma: no cover - every kind above is handled
        raise AssertionError(kind)
    return Malformed(model, inputs, name, kind)
