"""A user's own events in JSON Lines, one event per line (or the same as Parquet rows).

    {"user": "u1", "time": 1700000000, "text": "Toy Story", "image": "img/toy.png",
     "labels": ["genre:Comedy"], "item": "tt0114709", "rating": 4}

`user`, `time` and `text` are required; `image` (a path relative to the file's folder, or
null), `labels`, `item` and `rating` are optional; a `rating` reaches the model as the label
`rating:<r>`, as a MovieLens rating does. `time` is unix seconds or an ISO-8601
string (without a zone it is taken as UTC). Unknown keys are errors, so a misspelt field is
reported instead of silently dropped. Every error names the file and line, because these
files are written by hand or by someone else's export script.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dynemb.data.types import Dataset, Interaction, Item
from dynemb.errors import DynembError
from dynemb_client import ClientInputError
from dynemb_client.contract import MAX_TIME_S
from dynemb_client.events import check_image

logger = logging.getLogger(__name__)

KNOWN_KEYS = frozenset({"user", "time", "text", "image", "labels", "item", "rating"})
# Labels that describe the event rather than the item; kept off the derived Item.
EVENT_LABEL_PREFIXES = ("rating:", "action:")


class DataError(DynembError, ValueError):
    """A malformed input record; the message starts with `file:line:`."""


@dataclass(frozen=True)
class _Line:
    """Where a record came from, for error messages (a line, or a Parquet row)."""

    path: Path
    lineno: int

    def error(self, message: str) -> DataError:
        return DataError(f"{self.path}:{self.lineno}: {message}")


def load_jsonl(path: Path) -> Dataset:
    """Read all events; items are derived from them (first occurrence gives title and image).

    Interactions are sorted by (user, time) with a stable sort, so equal times keep file order.
    An event without `item` gets a stable id from its text, so repeated texts share an item.
    """
    path = Path(path)
    images: dict[Path, bytes] = {}
    interactions: list[Interaction] = []
    try:
        content = path.read_bytes()
    except OSError as exc:  # missing, a folder, unreadable: the user's path, said plainly
        raise DataError(f"{path}: cannot read the events file: {exc.strerror}") from None
    for lineno, raw in enumerate(content.splitlines(), start=1):
        where = _Line(path, lineno)
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise where.error(f"not UTF-8 ({exc.reason})") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise where.error(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit number; deep nesting
            raise where.error(f"JSON this reader cannot take: {exc}"[:300]) from None
        interactions.append(_parse_event(record, where, images))
    return _dataset(path, interactions)


def load_parquet(path: Path) -> Dataset:
    """The same events as a Parquet file: one row per event, the JSON Lines keys as
    columns (an optional column may be absent; null reads as absent); errors name the row
    (`file:row:`)."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    images: dict[Path, bytes] = {}
    interactions = [
        _parse_event(record, _Line(path, row), images)
        for row, record in enumerate(table.to_pylist(), start=1)
    ]
    return _dataset(path, interactions)


def load_events(path: Path) -> Dataset:
    """A JSON Lines (.jsonl, .json) or Parquet (.parquet) events file, by its suffix."""
    path = Path(path)
    if path.suffix == ".parquet":
        return load_parquet(path)
    if path.suffix in (".jsonl", ".json"):
        return load_jsonl(path)
    raise DataError(f"{path}: not an events file (expected .jsonl, .json or .parquet)")


def _dataset(path: Path, interactions: list[Interaction]) -> Dataset:
    if not interactions:
        raise DataError(f"{path}: no events")
    items = _derive_items(interactions)  # before sorting: "first" means first in the file
    interactions.sort(key=lambda event: (event.user_id, event.time))  # stable: ties keep order
    logger.info("%s: %d events, %d items", path, len(interactions), len(items))
    return Dataset(
        name=path.stem,
        items=items,
        interactions=interactions,
        synthetic=False,
        meta={"source": f"events file {path}"},
    )


def iter_user_events(
    path: Path, user: str | None = None
) -> Iterator[tuple[str, list[Interaction]]]:
    """Yield (user_id, that user's events in time order), for all users or only `user`."""
    users = load_events(path).by_user()
    if user is not None:
        if user not in users:
            raise DataError(f"{path}: no events for user {user!r}")
        users = {user: users[user]}
    yield from users.items()


def _parse_event(record: Any, where: _Line, images: dict[Path, bytes]) -> Interaction:
    if not isinstance(record, dict):
        raise where.error(f"expected a JSON object, got {_type_name(record)}")
    unknown = sorted(set(record) - KNOWN_KEYS)
    if unknown:
        raise where.error(
            f"unknown key(s) {', '.join(map(repr, unknown))}; expected {sorted(KNOWN_KEYS)}"
        )
    user = _get_str(record, "user", where, required=True)
    if not user:
        raise where.error("'user' must be a non-empty string")
    text = _get_str(record, "text", where, required=True)
    time = _parse_time(record.get("time"), where)
    item_id = _get_str(record, "item", where) or _text_item_id(text)
    labels = _parse_labels(record.get("labels"), where)
    rating = record.get("rating")
    if rating is not None and not (_is_number(rating) and math.isfinite(rating)):
        raise where.error(f"'rating' must be a finite number or null, got {rating!r}")
    labels = _with_rating_label(labels, rating, where)
    image_path = _get_str(record, "image", where)
    image = _read_image(where, image_path, images) if image_path else None
    return Interaction(
        user_id=user,
        item_id=item_id,
        time=time,
        text=text,
        labels=labels,
        image=image,
        rating=None if rating is None else float(rating),
    )


def _with_rating_label(labels: tuple[str, ...], rating: Any, where: _Line) -> tuple[str, ...]:
    """`rating` as the label the models read, `rating:<r>` (as MovieLens events carry
    it): the field alone was read, checked and then ignored, since only labels reach the
    model. A `rating:` label that says another value is an error."""
    if rating is None:
        return labels
    label = f"rating:{float(rating):g}"
    given = [x for x in labels if x.startswith("rating:")]
    if not given:
        return (label, *labels)  # first: the model reads M labels, a cut drops the last
    try:
        same = all(float(x.removeprefix("rating:")) == float(rating) for x in given)
    except ValueError:
        same = False
    if not same:
        raise where.error(f"'rating' {rating!r} and the label {given[0]!r} disagree")
    return labels


def _get_str(record: dict[str, Any], key: str, where: _Line, required: bool = False) -> str:
    """The string at `key`; "" when absent or null and not required."""
    value = record.get(key)
    if value is None:
        if required and key in record:
            raise where.error(f"{key!r} must be a string, got null")
        if required:
            raise where.error(f"missing required key {key!r}")
        return ""
    if not isinstance(value, str):
        raise where.error(f"{key!r} must be a string, got {_type_name(value)}")
    return _utf8(value, repr(key), where)


def _utf8(value: str, name: str, where: _Line) -> str:
    """`value`, which must be encodable as UTF-8 (JSON's "\\ud800" escape, a lone half of
    a surrogate pair, decodes to a string that is not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise where.error(f"{name} is not valid text ({exc.reason} at {exc.start})") from None
    return value


def _parse_time(value: Any, where: _Line) -> float:
    if value is None:
        raise where.error("missing required key 'time'")
    if _is_number(value):
        try:
            seconds = float(value)
        except OverflowError:
            raise where.error("'time' is too large for unix seconds") from None
    elif isinstance(value, str):
        try:
            seconds = iso_seconds(value)
        except ValueError:
            raise where.error(
                f"'time' must be unix seconds or an ISO-8601 string, got {value!r}"
            ) from None
    else:
        raise where.error(
            f"'time' must be unix seconds or an ISO-8601 string, got {_type_name(value)}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise where.error(f"'time' must be a finite, non-negative unix time, got {value!r}")
    if seconds > MAX_TIME_S:
        hint = " (milliseconds? 'time' is in seconds)" if seconds > 1000 * 946_684_800 else ""
        raise where.error(f"'time' {value!r} is after the year 2100{hint}")
    return seconds


def _parse_labels(value: Any, where: _Line) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise where.error(f"'labels' must be a list of strings, got {_type_name(value)}")
    for index, label in enumerate(value):
        if not isinstance(label, str) or not label:
            raise where.error(f"'labels'[{index}] must be a non-empty string, got {label!r}")
        _utf8(label, f"'labels'[{index}]", where)
    return tuple(value)


def _read_image(where: _Line, relative: str, cache: dict[Path, bytes]) -> bytes:
    """Image paths are relative to the JSONL file's folder (absolute paths also work)."""
    path = where.path.parent / relative
    if path not in cache:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise where.error(f"cannot read image {relative!r}: {exc.strerror}") from None
        try:
            check_image(data, 0)  # what the client would refuse to send, said here
        except ClientInputError as exc:
            raise where.error(f"image {relative!r}: {exc.reason}") from None
        cache[path] = data
    return cache[path]


def _derive_items(interactions: list[Interaction]) -> dict[str, Item]:
    """One Item per item id: the first event's text as title, its item-level labels, and the
    first image seen for it."""
    items: dict[str, Item] = {}
    for event in interactions:
        item = items.get(event.item_id)
        if item is None:
            labels = tuple(
                label for label in event.labels if not label.startswith(EVENT_LABEL_PREFIXES)
            )
            items[event.item_id] = Item(event.item_id, event.text, labels, event.image)
        elif item.image is None and event.image is not None:
            items[event.item_id] = Item(item.item_id, item.title, item.labels, event.image)
    return items


def iso_seconds(value: str) -> float:
    """An ISO-8601 time ("2023-11-16T00:00:00Z"; UTC when it names no zone) as unix
    seconds; ValueError if it is none."""
    iso = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    stamp = datetime.fromisoformat(iso)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


def _text_item_id(text: str) -> str:
    """Stable across runs and machines (unlike `hash`), so ids survive a reload."""
    return "text-" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
