"""The caller-facing event type and the checks that turn one event into wire values."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from dynemb_client.contract import EVENT_IMAGE, EVENT_LABELS, EVENT_TEXT, MAX_TIME_S
from dynemb_client.errors import ClientInputError

__all__ = ["Event", "TimeLike", "to_unix_seconds"]

TimeLike = int | float | datetime
ImageLike = bytes | bytearray | memoryview | str | os.PathLike | None

# Magic numbers of the formats the server decodes; anything else would fail server-side.
_IMAGE_SIGNATURES: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",  # BMP
)


@dataclass(frozen=True)
class Event:
    """One thing a user did.

    `time` is unix seconds or a datetime (naive means UTC). `image` is encoded bytes, a
    file path (read only when a request is built, so histories stay cheap to hold) or None.
    `labels` are strings such as "genre:Comedy". Values are checked when a request is
    built, where the error can name the event's position.
    """

    time: TimeLike
    text: str | bytes
    image: ImageLike = None
    labels: Sequence[str] = ()

    def __post_init__(self) -> None:
        # A list would make the frozen event unhashable; a bare str, and a set (its order,
        # which the first label's features read, changes between processes), are left for
        # the request builder to reject with a clear message, as is a mapping (whose keys
        # a tuple would silently take).
        if not isinstance(self.labels, (str, bytes, tuple, AbstractSet, Mapping)):
            with contextlib.suppress(TypeError):
                object.__setattr__(self, "labels", tuple(self.labels))


def to_unix_seconds(value: object, *, field: str, index: int | None = None) -> float:
    """Unix seconds as a float, or ClientInputError if the value is no usable time."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        seconds = value.timestamp()
    elif isinstance(value, bool) or not _is_real(value):
        raise ClientInputError(
            f"time must be unix seconds or a datetime, not {type(value).__name__}",
            field=field,
            index=index,
        )
    else:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except OverflowError:  # an int past a float's range
            seconds = math.inf
    if not math.isfinite(seconds):
        raise ClientInputError(f"time must be finite, got {seconds}", field=field, index=index)
    if seconds < 0:
        raise ClientInputError(
            f"time must not be negative, got {seconds}", field=field, index=index
        )
    if seconds > MAX_TIME_S:
        raise ClientInputError(
            f"time {seconds} is after 2100-01-01 (> {MAX_TIME_S:.0f}); "
            "milliseconds instead of seconds?",
            field=field,
            index=index,
        )
    return seconds


def _is_real(value: object) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except OverflowError:
        return True  # a real number, too large: said as not finite
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bytes, complex))


def text_bytes(text: object, index: int) -> bytes:
    """The event's text as UTF-8 bytes; bytes must already be valid UTF-8."""
    if isinstance(text, str):
        return _utf8(text, EVENT_TEXT, index)
    if isinstance(text, (bytes, bytearray, memoryview)):
        raw = bytes(text)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ClientInputError(
                f"text bytes are not valid UTF-8 ({exc.reason} at byte {exc.start})",
                field=EVENT_TEXT,
                index=index,
            ) from None
        return raw
    raise ClientInputError(
        f"text must be str or UTF-8 bytes, not {type(text).__name__}", field=EVENT_TEXT, index=index
    )


def check_labels(labels: object, max_labels: int, index: int) -> list[bytes]:
    """The event's labels as UTF-8 bytes, at most `max_labels`, none empty."""
    if isinstance(labels, (str, bytes)):
        raise ClientInputError(
            f"labels must be a sequence of strings, not a single {type(labels).__name__} "
            f"({labels!r}); wrap it in a tuple",
            field=EVENT_LABELS,
            index=index,
        )
    if isinstance(labels, Mapping):
        raise ClientInputError(
            f"labels must be a sequence of strings, not a {type(labels).__name__} (its keys "
            "would be taken): pass a tuple or list",
            field=EVENT_LABELS,
            index=index,
        )
    if isinstance(labels, AbstractSet):
        raise ClientInputError(
            "labels are ordered (the first is the event's main label, which its features "
            f"read), not a {type(labels).__name__}: pass a tuple or list",
            field=EVENT_LABELS,
            index=index,
        )
    try:
        items = list(labels)  # type: ignore[call-overload]
    except TypeError:
        raise ClientInputError(
            f"labels must be a sequence of strings, not {type(labels).__name__}",
            field=EVENT_LABELS,
            index=index,
        ) from None
    if len(items) > max_labels:
        raise ClientInputError(
            f"{len(items)} labels, the server accepts at most {max_labels}",
            field=EVENT_LABELS,
            index=index,
        )
    for label in items:
        if not isinstance(label, str):
            raise ClientInputError(
                f"label {label!r} is {type(label).__name__}, not str",
                field=EVENT_LABELS,
                index=index,
            )
        if not label:
            raise ClientInputError(
                "empty label (b'' means padding)", field=EVENT_LABELS, index=index
            )
    return [_utf8(label, EVENT_LABELS, index) for label in items]


def _utf8(text: str, field: str, index: int) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from JSON "\ud800"
        raise ClientInputError(
            f"not encodable as UTF-8 ({exc.reason} at character {exc.start})",
            field=field,
            index=index,
        ) from None


def check_image(image: object, index: int) -> Path | bytes:
    """Validate the image cheaply: a path must exist, bytes must look like an image.

    Returns the path (read later, only for events that are sent) or the bytes.
    """
    if image is None:
        return b""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        _check_signature(data, index, source="image bytes")
        return data
    if isinstance(image, (str, os.PathLike)):
        if not os.fspath(image):
            raise ClientInputError(
                "image path is empty (None is no image)", field=EVENT_IMAGE, index=index
            )
        path = Path(image)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise ClientInputError(
                f"image file {str(path)!r} {what}", field=EVENT_IMAGE, index=index
            )
        return path
    raise ClientInputError(
        f"image must be bytes, a file path or None, not {type(image).__name__}",
        field=EVENT_IMAGE,
        index=index,
    )


def image_bytes(image: Path | bytes, index: int) -> bytes:
    """The encoded image to send (b"" = no image); reads and checks a path."""
    if isinstance(image, bytes):
        return image
    try:
        data = image.read_bytes()
    except OSError as exc:
        raise ClientInputError(
            f"cannot read image file {str(image)!r}: {exc.strerror}", field=EVENT_IMAGE, index=index
        ) from exc
    if not data:
        raise ClientInputError(
            f"image file {str(image)!r} is empty", field=EVENT_IMAGE, index=index
        )
    _check_signature(data, index, source=f"image file {str(image)!r}")
    return data


def _check_signature(data: bytes, index: int, *, source: str) -> None:
    if not data:
        return  # b"" is the contract's "no image"
    if data.startswith(_IMAGE_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return
    raise ClientInputError(
        f"{source} is not PNG, JPEG, GIF, BMP or WEBP (starts with {data[:8]!r})",
        field=EVENT_IMAGE,
        index=index,
    )
