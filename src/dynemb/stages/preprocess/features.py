"""Preprocessing: users' raw event tensors -> the fixed-shape tensors the stages read.

Pure numpy + tokenizers + Pillow, no Triton and no torch: the `preprocess` model, the
in-process pipeline and training call the same functions, so they agree exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from dynemb.dims import Dims
from dynemb.errors import InputError
from dynemb.serving.cache import RowCache
from dynemb_client import contract as wire

PAD_LABEL, UNK_LABEL = 0, 1

# Limits on one request's content, so that one request cannot hold the stage (and every
# request queued behind it) for seconds: a 1 MB text took 1.3 s to tokenise, a 136 kB PNG
# declaring 12000x12000 pixels 2.0 s to decode. Larger content is bad input (INVALID_ARG).
MAX_TEXT_BYTES = 64 * 1024  # an event's text; only its first T word pieces are read
MAX_LABEL_BYTES = 1024  # one label
MAX_IMAGE_BYTES = 8 * 2**20  # one encoded image
MAX_IMAGE_PIXELS = 4096 * 4096  # one image's declared width x height, checked before decoding
MAX_USER_IMAGE_BYTES = 32 * 2**20  # all of a user's encoded images together
# ... and the pixels they declare: decoding them takes about 17 ms a million here (a
# 4096x4096 PNG 291 ms), so a user's images cost at most about 1 s.
MAX_USER_IMAGE_PIXELS = 64 * 2**20
EXIF_ORIENTATION = 0x0112
RESIZE_HINT = " (the model reads each image at 32x32: send them a few hundred pixels a side)"
_DAY_S, _WEEK_S, _HOUR_S = 86_400.0, 7 * 86_400.0, 3_600.0
# 1970-01-01 was a Thursday: shift so that weekday 0 is Monday.
_EPOCH_WEEKDAY_OFFSET_S = 3 * _DAY_S


@dataclass(frozen=True)
class PreprocessAssets:
    """What travels inside the preprocess version directory."""

    dims: Dims
    labels: dict[str, int]  # label string -> id; 0 = padding, 1 = unknown
    tokenizer_json: str

    TOKENIZER: ClassVar[str] = "tokenizer.json"
    META: ClassVar[str] = "assets.json"

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.TOKENIZER).write_text(self.tokenizer_json, encoding="utf-8")
        meta = {"dims": self.dims.to_json(), "labels": self.labels}
        (directory / self.META).write_text(
            json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8"
        )

    @classmethod
    def load(cls, directory: Path) -> PreprocessAssets:
        meta = json.loads((directory / cls.META).read_text(encoding="utf-8"))
        labels = meta["labels"]
        if not isinstance(labels, dict):
            raise ValueError(f"{directory / cls.META}: 'labels' is not a vocabulary")
        tokenizer = (directory / cls.TOKENIZER).read_text(encoding="utf-8")
        return cls(Dims.from_json(meta["dims"]), labels, tokenizer)


def build_label_vocab(labels: set[str] | list[str]) -> dict[str, int]:
    vocab = {"<pad>": PAD_LABEL, "<unk>": UNK_LABEL}
    for label in sorted(set(labels)):
        vocab.setdefault(label, len(vocab))
    return vocab


@dataclass(frozen=True)
class EventLabels:
    """One event's labels as decoded strings and as vocabulary ids, its rating and what the
    row costs a session (what the label cache keeps: time features read the strings and
    the rating, label_mlp the ids)."""

    labels: tuple[str, ...]
    ids: np.ndarray  # (M,) int64
    rating: float  # from a "rating:4" label, NaN without one (`event_ratings`)
    row_bytes: int  # label_row_bytes([labels])

    @classmethod
    def of(cls, labels: tuple[str, ...], ids: np.ndarray) -> EventLabels:
        return cls(labels, ids, _rating(labels), label_row_bytes([labels]))

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + sum(50 + len(label) for label in self.labels)


@dataclass(frozen=True)
class PreprocessCaches:
    """Per-item work of preprocess, remembered by content: a text's tokens (keyed by its
    raw bytes), an image's pixels (by a digest of its encoded bytes), an event's labels
    (by its label row). Only content that passed validation is ever cached."""

    texts: RowCache | None = None
    images: RowCache | None = None
    labels: RowCache | None = None

    @classmethod
    def bounded(cls, entries: int, megabytes: float) -> PreprocessCaches:
        """Three caches of `entries` each, sharing `megabytes` (a third each)."""
        if entries <= 0 or megabytes <= 0:
            return cls()
        size = int(megabytes * 2**20 / 3)
        return cls(RowCache(entries, size), RowCache(entries, size), RowCache(entries, size))

    def by_name(self) -> dict[str, RowCache]:
        named = {"texts": self.texts, "images": self.images, "labels": self.labels}
        return {name: cache for name, cache in named.items() if cache is not None}


@dataclass(frozen=True)
class SessionEvents:
    """A session's new events, preprocessed: their times and labels, and the per-item
    stage inputs (k rows each, no events axis padding) by tensor name."""

    times: np.ndarray  # (k,) float64
    query_time: float
    labels: list[list[str]]
    ratings: np.ndarray  # (k,) float64, `event_ratings(labels)`
    label_bytes: int  # label_row_bytes(labels)
    tensors: dict[str, np.ndarray]


class Preprocessor:
    """Turns users' raw tensors into stage inputs; raises InputError naming the field."""

    def __init__(self, assets: PreprocessAssets, caches: PreprocessCaches | None = None) -> None:
        self.dims = assets.dims
        self.labels = assets.labels
        self.caches = caches or PreprocessCaches()
        self.tokenizer = Tokenizer.from_str(assets.tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Preprocess a batch of users (leading dimension): each user's events are read and
        checked in turn, then the time and query features of the whole batch are computed
        in one vectorised pass each (a third less time a user at 32 users than one user at
        a time; see `time_feature_batch`)."""
        d = self.dims
        users, length = inputs[wire.EVENT_TEXT].shape[0], d.max_events
        out = {
            "TOKEN_IDS": np.zeros((users, length, d.max_tokens), np.int64),
            "TOKEN_COUNT": np.zeros((users, length), np.int64),
            "IMAGE_PIXELS": np.zeros((users, length, 3, d.image_size, d.image_size), np.uint8),
            "IMAGE_MASK": np.zeros((users, length), bool),
            "LABEL_IDS": np.full((users, length, d.max_labels), PAD_LABEL, np.int64),
            "TIME_FEATURES": np.zeros((users, length, d.time_dim), np.float32),
            "EVENT_MASK": np.zeros((users, length), bool),
        }
        histories = []
        for b in range(users):
            try:
                histories.append(self._read_user(b, {k: v[b] for k, v in inputs.items()}, out))
            except InputError as exc:
                exc.row = b
                raise
        time_rows = time_feature_batch([events for events, _ in histories], d)
        for b, features in enumerate(time_rows):
            out["TIME_FEATURES"][b, : len(features)] = features
        times = [events.times for events, _ in histories]
        at = np.array([query_time for _, query_time in histories])
        out["QUERY_FEATURES"] = query_feature_batch(times, at, d)
        return out

    def checked_times(self, x: dict[str, np.ndarray]) -> tuple[int, float, np.ndarray]:
        """EVENT_COUNT, QUERY_TIME and the real events' times of one user, checked: a count
        within L, finite times in range, non-decreasing."""
        max_events = self.dims.max_events
        count = int(x[wire.EVENT_COUNT].reshape(-1)[0])
        if not 0 <= count <= max_events:
            raise InputError(wire.EVENT_COUNT, f"must be in [0, {max_events}], got {count}")
        query_time = _check_time(wire.QUERY_TIME, float(x[wire.QUERY_TIME].reshape(-1)[0]))
        times = np.asarray(x[wire.EVENT_TIME], dtype=np.float64)[:count]
        for i, value in enumerate(times):
            _check_time(f"{wire.EVENT_TIME}[{i}]", float(value))
        if count > 1 and np.any(np.diff(times) < 0):
            first = int(np.argmax(np.diff(times) < 0)) + 1
            raise InputError(f"{wire.EVENT_TIME}[{first}]", "event times must be non-decreasing")
        return count, query_time, times

    def user(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One user's raw tensors (no batch axis) -> the stage inputs (no batch axis)."""
        batch = self({name: value[None] for name, value in x.items()})
        return {name: value[0] for name, value in batch.items()}

    def _read_user(
        self, b: int, x: dict[str, np.ndarray], out: dict[str, np.ndarray]
    ) -> tuple[TimeRows, float]:
        """Check user `b`'s events and write its per-event rows of `out`; returns the
        events E_t reads (their times and labels) and the query time."""
        d = self.dims
        count, query_time, times = self.checked_times(x)
        # Events after the query time are in t's future: E_t must not see them.
        n = int(np.searchsorted(times, query_time, side="right"))
        # Every real event must be well-formed, even one past t that is then ignored.
        out["TOKEN_IDS"][b], out["TOKEN_COUNT"][b] = self.event_tokens(
            x[wire.EVENT_TEXT][:count], d.max_events, n
        )
        events = [self.event_labels(i, x[wire.EVENT_LABELS][i]) for i in range(count)][:n]
        if events:
            out["LABEL_IDS"][b, :n] = np.stack([e.ids for e in events])
        out["IMAGE_PIXELS"][b], out["IMAGE_MASK"][b] = self.images(
            x[wire.EVENT_IMAGE][:count], d.max_events, keep=n
        )
        out["EVENT_MASK"][b, :n] = True
        return TimeRows(times[:n], [list(e.labels) for e in events]), query_time

    def session_events(self, x: dict[str, np.ndarray], newest: float | None) -> SessionEvents:
        """One session's new events (the first EVENT_COUNT of `x`, checked as `user` checks
        a history) and the query time, for a session whose newest event is at `newest`
        (None: it holds none). New events may not precede `newest` nor follow the query
        time: a session cannot take back what E_t has already read."""
        d = self.dims
        count, query_time, times = self.checked_times(x)
        if count and newest is not None and times[0] < newest:
            raise InputError(
                f"{wire.EVENT_TIME}[0]", f"{times[0]} precedes the session's newest event {newest}"
            )
        latest = times[-1] if count else newest
        if latest is not None and query_time < latest:
            raise InputError(
                wire.QUERY_TIME,
                f"{query_time} precedes the newest event {latest}; a session's "
                "events cannot be in t's future",
            )
        token_ids, token_count = self.event_tokens(x[wire.EVENT_TEXT][:count], count, count)
        rows = [x[wire.EVENT_LABELS][i] for i in range(count)]
        events = [self.event_labels(i, row) for i, row in enumerate(rows)]
        label_ids = np.array([e.ids for e in events], np.int64).reshape(count, d.max_labels)
        pixels, image_mask = self.images(x[wire.EVENT_IMAGE][:count], count, keep=count)
        return SessionEvents(
            times=times,
            query_time=query_time,
            labels=[list(e.labels) for e in events],
            ratings=np.array([e.rating for e in events], np.float64),
            label_bytes=sum(e.row_bytes for e in events),
            tensors={
                "TOKEN_IDS": token_ids,
                "TOKEN_COUNT": token_count,
                "IMAGE_PIXELS": pixels,
                "IMAGE_MASK": image_mask,
                "LABEL_IDS": label_ids,
            },
        )

    def event_labels(self, i: int, row: np.ndarray) -> EventLabels:
        """Event i's labels, decoded and mapped to ids (cached by the row's bytes)."""
        raw = [v if isinstance(v, bytes) else bytes(v) for v in row]
        joined = b"\0".join(raw)
        # NUL-joined rows of a fixed width are distinct keys unless a label holds a NUL.
        cache = self.caches.labels if joined.count(b"\0") == len(raw) - 1 else None
        found = cache.get(joined) if cache is not None else None
        if found is not None:
            return found
        for j, v in enumerate(raw):
            if len(v) > MAX_LABEL_BYTES:
                field = f"{wire.EVENT_LABELS}[{i}][{j}]"
                raise InputError(field, f"{len(v)} bytes, the limit is {MAX_LABEL_BYTES}")
        decoded = (_utf8(f"{wire.EVENT_LABELS}[{i}][{j}]", v) for j, v in enumerate(raw))
        labels = tuple(label for label in decoded if label)
        event = EventLabels.of(labels, self.label_ids([list(labels)], 1)[0])
        if cache is not None:
            cache.put(joined, event, event.nbytes)
        return event

    def event_tokens(
        self, raw_texts: np.ndarray, rows: int, keep: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and counts of the first `keep` texts (each text is checked to be UTF-8,
        even one past `keep`); texts seen before come from the cache."""
        t = self.dims.max_tokens
        ids = np.zeros((rows, t), dtype=np.int64)
        counts = np.zeros(rows, dtype=np.int64)
        cache = self.caches.texts
        todo: list[tuple[int, bytes, str]] = []
        for i, value in enumerate(raw_texts):
            raw = value if isinstance(value, bytes) else bytes(value)
            found = cache.get(raw) if cache is not None else None
            if found is None:
                if len(raw) > MAX_TEXT_BYTES:
                    field = f"{wire.EVENT_TEXT}[{i}]"
                    raise InputError(field, f"{len(raw)} bytes, the limit is {MAX_TEXT_BYTES}")
                text = _utf8(f"{wire.EVENT_TEXT}[{i}]", raw)
                if i < keep:
                    todo.append((i, raw, text))
            elif i < keep:
                ids[i], counts[i] = found[:t], found[t]
        if todo:
            fresh_ids, fresh_counts = self.tokens([text for _, _, text in todo], len(todo))
            for (i, raw, _), row, n in zip(todo, fresh_ids, fresh_counts, strict=True):
                ids[i], counts[i] = row, n
                if cache is not None:
                    cache.put(raw, np.append(row, n))
        return ids, counts

    def items(self, texts: list[str], images: list[bytes | None], labels: list[list[str]]) -> dict:
        """Content tensors of catalogue items (one row per item), for the item table."""
        n = len(texts)
        ids, counts = self.tokens(texts, n)
        pixels, mask = self.images([image or b"" for image in images], n, keep=n, one_user=False)
        return {
            "TOKEN_IDS": ids,
            "TOKEN_COUNT": counts,
            "IMAGE_PIXELS": pixels,
            "IMAGE_MASK": mask,
            "LABEL_IDS": self.label_ids(labels, n),
        }

    def tokens(self, texts: list[str], rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The first T word pieces of each text and their count. A long text is tokenised
        from a prefix that ends at whitespace, which splits words and never joins them, so
        the prefix's word pieces begin the whole text's; only where the prefix gives fewer
        than T is the whole text read (a 64 kB text took 85 ms, for T pieces)."""
        t = self.dims.max_tokens
        ids = np.zeros((rows, t), dtype=np.int64)
        counts = np.zeros(rows, dtype=np.int64)
        if not texts:
            return ids, counts
        prefixes = [text_prefix(text, TOKENISED_CHARS_PER_PIECE * t) for text in texts]
        encodings = self.tokenizer.encode_batch(prefixes, add_special_tokens=False)
        for i, (enc, prefix, text) in enumerate(zip(encodings, prefixes, texts, strict=True)):
            if len(enc.ids) < t and len(prefix) < len(text):
                enc = self.tokenizer.encode(text, add_special_tokens=False)
            row = enc.ids[:t]
            ids[i, : len(row)] = row
            counts[i] = len(row)
        return ids, counts

    def images(
        self, encoded, rows: int, keep: int, one_user: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode every given image (a bad one is an error even past t); keep the first
        `keep`. `one_user`: they are one user's, held to the per-user limits on bytes and
        declared pixels (a whole catalogue's, at build or training time, is not). An image
        the user has more than once (a product viewed again) counts once: it is decoded
        once (17 views of one 2048x2048 photo had passed the pixel limit)."""
        s = self.dims.image_size
        pixels = np.zeros((rows, 3, s, s), dtype=np.uint8)
        mask = np.zeros(rows, dtype=bool)
        cache = self.caches.images
        total = declared = 0
        counted: dict[bytes, tuple[np.ndarray, int]] = {}  # this user's, by digest
        for i, data in enumerate(encoded):
            data = bytes(data)
            if not data:
                continue
            field = f"{wire.EVENT_IMAGE}[{i}]"
            if len(data) > MAX_IMAGE_BYTES:
                raise InputError(field, f"{len(data)} bytes, the limit is {MAX_IMAGE_BYTES}")
            keyed = cache is not None or one_user
            key = hashlib.blake2b(data, digest_size=16).digest() if keyed else b""
            if key in counted:
                if i < keep:
                    pixels[i], mask[i] = counted[key][0], True
                continue
            total += len(data)
            if one_user and total > MAX_USER_IMAGE_BYTES:
                raise InputError(
                    field,
                    f"the images reach {total} bytes, the limit is {MAX_USER_IMAGE_BYTES}"
                    f"{RESIZE_HINT}",
                )
            found = cache.get(key) if cache is not None else None
            if found is None:  # the declared size is checked before any decoding
                budget = MAX_USER_IMAGE_PIXELS - declared if one_user else None
                found = decode_image_sized(field, data, s, budget)
                if cache is not None:
                    cache.put(key, found, found[0].nbytes + 64)
            decoded, size = found
            if keyed:
                counted[key] = found
            declared += size
            if one_user and declared > MAX_USER_IMAGE_PIXELS:  # counted for cached ones too
                raise InputError(
                    field,
                    f"the images declare {declared} pixels, the limit is {MAX_USER_IMAGE_PIXELS}"
                    f"{RESIZE_HINT}",
                )
            if i < keep:
                pixels[i], mask[i] = decoded, True
        return pixels, mask

    def label_ids(self, labels: list[list[str]], rows: int) -> np.ndarray:
        ids = np.full((rows, self.dims.max_labels), PAD_LABEL, dtype=np.int64)
        for i, row in enumerate(labels):
            for j, label in enumerate(row[: self.dims.max_labels]):
                ids[i, j] = self.labels.get(label, UNK_LABEL)
        return ids


# A text is tokenised from its first (this x T) characters, cut at whitespace after them.
TOKENISED_CHARS_PER_PIECE = 32
_BREAK = re.compile(r"[ \t\n\r]")  # whitespace to every BERT-style pre-tokeniser


def text_prefix(text: str, chars: int) -> str:
    """`text` up to the first whitespace at or after `chars` characters (all of it if it
    is no longer, or has no whitespace there)."""
    if len(text) <= chars:
        return text
    found = _BREAK.search(text, chars)
    return text if found is None else text[: found.start()]


def upright_rgb(image: Image.Image) -> Image.Image:
    """The picture as a viewer shows it, in 8-bit RGB: turned as its EXIF orientation
    says (a phone photo's sensor pixels lie on their side), 16- and 32-bit gray scaled
    to 8 bits (converted as they were, a 16-bit PNG came out white), transparent pixels
    over white (a product cut-out's background; converted as they were, black)."""
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:  # else it would copy every pixel
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":  # I, I;16, I;16B, ...: gray
        gray = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode != "F" and gray.max(initial=0) > 255):
            gray = gray / 257.0  # 16-bit levels to 8-bit ones
        image = Image.fromarray(np.clip(np.rint(gray), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        over = Image.new("RGBA", image.size, (255, 255, 255, 255))
        over.alpha_composite(image.convert("RGBA"))
        return over.convert("RGB")
    return image.convert("RGB")


def decode_image_sized(
    field: str, data: bytes, size: int, budget: int | None = None
) -> tuple[np.ndarray, int]:
    """Encoded bytes -> (3, size, size) uint8 RGB and the pixels it declares. The declared
    size is checked from the header before anything is decoded, against the limit for
    one image and the `budget` left (a decompression bomb is bad input, not a stall).
    A JPEG is decoded at the smallest of its DCT scales (1/2, 1/4, 1/8) that still covers
    `size` (PIL's draft mode), 2-3x faster for a photo than decoding every pixel to throw
    nearly all of them away; the 32x32 result differs by about one level in 255."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InputError(
                        field,
                        f"declares {width}x{height} pixels, the limit is {MAX_IMAGE_PIXELS}",
                    )
                if budget is not None and width * height > budget:
                    raise InputError(
                        field,
                        f"declares {width}x{height} pixels, past what is left of the limit "
                        f"on a user's images together ({MAX_USER_IMAGE_PIXELS})",
                    )
                image.draft("RGB", (size, size))  # JPEG only; other formats ignore it
                rgb = upright_rgb(image).resize((size, size), Image.Resampling.BILINEAR)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(field, f"is too large to decode ({exc})") from exc
    except Image.UnidentifiedImageError as exc:  # its text names a BytesIO at an address
        raise InputError(field, "could not be decoded as an image (no format recognised)") from exc
    except Exception as exc:  # PIL's plugins raise more than their documented errors
        raise InputError(field, f"could not be decoded as an image ({exc})") from exc
    decoded = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()
    decoded.setflags(write=False)  # cached and shared
    return decoded, width * height


def _utf8(field: str, value: object) -> str:
    raw = value if isinstance(value, bytes) else bytes(value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(field, f"is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def _check_time(field: str, value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > wire.MAX_TIME_S:
        raise InputError(
            field, f"must be unix seconds in [0, {wire.MAX_TIME_S:.0f}] (year 2100), got {value!r}"
        )
    return value


def _cycles(times: np.ndarray) -> np.ndarray:
    """Hour-of-day and day-of-week as sin/cos pairs (UTC)."""
    day = 2 * np.pi * (times % _DAY_S) / _DAY_S
    week = 2 * np.pi * ((times + _EPOCH_WEEKDAY_OFFSET_S) % _WEEK_S) / _WEEK_S
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], axis=-1)


MAX_RATING = 1e6  # a larger "rating:" value is no rating (its mean overflowed float32)


def _rating(labels: Sequence[str]) -> float:
    """The event's rating from its first "rating:" label; NaN (unrated) without one, or
    where its value is no number within ±MAX_RATING ("rating:good" stays a label)."""
    for label in labels:
        if label.startswith("rating:"):
            try:
                value = float(label.split(":", 1)[1])
            except ValueError:
                return math.nan
            return value if abs(value) <= MAX_RATING else math.nan
    return math.nan


def time_features(times: np.ndarray, labels: list[list[str]], dims: Dims) -> np.ndarray:
    """Per-event features that depend only on the event and the events before it, padded
    to L rows (see `time_feature_rows`)."""
    out = np.zeros((dims.max_events, dims.time_dim), dtype=np.float32)
    out[: len(times)] = time_feature_rows(times, labels, dims)
    return out


def time_feature_rows(
    times: np.ndarray,
    labels: list[list[str]],
    dims: Dims,
    first: int = 0,
    ratings: np.ndarray | None = None,
) -> np.ndarray:
    """The time features of events `first`.. of a history, (n - first, time_dim).

    Nothing here reads the query time t or a later event, so the features of the first k
    events of a history are the same whatever follows them: a causal model can score every
    prefix of a sequence in one pass (training), a session computes only its new events'
    rows (`first` = the events it held), and t enters through `query_features`.

    Columns: log time since the history's first event (hours), log gap to the previous
    event, hour sin/cos, weekday sin/cos, position from the oldest / L, then for each window
    w: log(1 + events in (t_i - w, t_i]), mean rating of those events / 5 (0 if none rated),
    share of them carrying the event's first label. `ratings` (`event_ratings(labels)`) may
    be passed in by a caller that keeps them.
    """
    return time_feature_batch([TimeRows(times, labels, first, ratings)], dims)[0]


@dataclass(frozen=True)
class TimeRows:
    """One history whose events `first`.. need time features (see time_feature_rows)."""

    times: np.ndarray
    labels: list[list[str]]
    first: int = 0
    ratings: np.ndarray | None = None


def time_feature_batch(histories: Sequence[TimeRows], dims: Dims) -> list[np.ndarray]:
    """`time_feature_rows` of several histories in one vectorised pass (a batch of
    sessions' new events): histories are padded to the longest, and padding sits after
    every row's own events, which the causal mask already leaves out."""
    sizes = [len(h.times) for h in histories]
    counts = [n - h.first for n, h in zip(sizes, histories, strict=True)]
    width = max(sizes, default=0)
    out = np.zeros((sum(counts), dims.time_dim), dtype=np.float32)
    if not len(out):
        return [out[:0] for _ in histories]
    # Every history's events side by side, scattered into the padded (H, width) arrays
    # in one assignment each (row-major order is the concatenation's).
    held = np.arange(width)[None, :] < np.asarray(sizes)[:, None]
    times = np.zeros((len(histories), width))
    times[held] = np.concatenate([h.times for h in histories])
    all_ratings = np.concatenate(
        [event_ratings(h.labels) if h.ratings is None else h.ratings for h in histories]
    )
    finite = np.isfinite(all_ratings)
    rated = np.zeros((len(histories), width), dtype=bool)
    rated[held] = finite
    known = np.zeros((len(histories), width))
    known[held] = np.where(finite, all_ratings, 0.0)
    same = np.zeros((len(out), width), dtype=bool)
    owner = np.repeat(np.arange(len(histories)), counts)
    index = np.concatenate([np.arange(h.first, n) for h, n in zip(histories, sizes, strict=True)])
    row = 0
    for h, n in zip(histories, sizes, strict=True):
        same[row : row + n - h.first, :n] = _shares_first_label(h.labels, h.first)
        row += n - h.first
    mine = times[owner]  # (rows, width): each row's own history
    rows = mine[np.arange(len(out)), index]
    prev_gap = rows - mine[np.arange(len(out)), np.maximum(index - 1, 0)]  # 0 for the first
    out[:, 0] = np.log1p((rows - mine[:, 0]) / _HOUR_S)
    out[:, 1] = np.log1p(prev_gap / _HOUR_S)
    out[:, 2:6] = _cycles(rows)
    out[:, 6] = index / dims.max_events
    # in_window[w, i, j]: event j is in row i's trailing window w (j <= its own index), for
    # every window at once: (windows, rows, width), so a session's new row is O(n).
    age = rows[:, None] - mine
    causal = np.arange(width)[None, :] <= index[:, None]
    windows = np.asarray(dims.windows_s, dtype=np.float64)[:, None, None]
    in_window = causal[None] & (age[None] < windows)
    count = in_window.sum(axis=2)
    rated_in = in_window & rated[owner][None]
    n_rated = rated_in.sum(axis=2)
    rating_sum = (rated_in * known[owner][None]).sum(axis=2)
    share = (in_window & same[None]).sum(axis=2) / count
    mean_rating = np.where(n_rated > 0, rating_sum / np.maximum(n_rated, 1) / 5.0, 0.0)
    # Columns 7 + 3k, 8 + 3k, 9 + 3k per window k: log count, mean rating / 5, share.
    out[:, 7:] = (
        np.stack([np.log1p(count), mean_rating, share], axis=-1)
        .transpose(1, 0, 2)
        .reshape(len(out), -1)
    )
    return np.split(out, np.cumsum(counts)[:-1])


def event_ratings(labels: list[list[str]]) -> np.ndarray:
    """Each event's rating from its labels ("rating:4"), NaN where it has none."""
    return np.array([_rating(row) for row in labels], dtype=np.float64)


def label_row_bytes(rows: Iterable[Sequence[str]]) -> int:
    """What label rows cost a session's state: their characters and 64 a row (the row's
    list and its pointers; the strings are shared with the label cache's rows)."""
    return sum(64 + sum(map(len, row)) for row in rows)


def _shares_first_label(labels: list[list[str]], first: int = 0) -> np.ndarray:
    """(n - first, n) bool: event j carries event (first + i)'s first label (False where it
    has none). Labels are compared as strings (two different unknown labels differ),
    through codes that this history's labels get here."""
    n = len(labels)
    if (n - first) * 8 <= n:  # a few new rows (a session's update): direct lookups
        out = np.zeros((n - first, n), dtype=bool)
        for r, i in enumerate(range(first, n)):
            if labels[i]:
                lead = labels[i][0]
                out[r] = np.fromiter([lead in row for row in labels], bool, n)
        return out
    codes: dict[str, int] = {}
    width = max((len(row) for row in labels), default=0) or 1
    matrix = np.full((len(labels), width), -1, dtype=np.int64)
    for i, row in enumerate(labels):
        for j, label in enumerate(row):
            matrix[i, j] = codes.setdefault(label, len(codes))
    leading = matrix[first:, 0]
    return (leading[:, None, None] == matrix[None, :, :]).any(axis=-1) & (leading >= 0)[:, None]


def query_features(times: np.ndarray, query_time: float, dims: Dims) -> np.ndarray:
    """Features of t itself: time since the newest event, cycles, history flag, window counts."""
    return query_feature_batch([times], np.array([query_time]), dims)[0]


def query_feature_batch(
    histories: Sequence[np.ndarray], query_times: np.ndarray, dims: Dims
) -> np.ndarray:
    """`query_features` of several histories (event times) and their query times, (B, Q)."""
    users = len(histories)
    out = np.zeros((users, dims.query_dim), dtype=np.float32)
    out[:, 1:5] = _cycles(np.asarray(query_times, dtype=np.float64))
    sizes = np.array([len(t) for t in histories])
    if not sizes.any():
        return out
    times = np.full((users, sizes.max()), -np.inf)  # padding is never within a window
    for b, t in enumerate(histories):
        times[b, : len(t)] = t
    some = sizes > 0
    newest = times[np.arange(users), np.maximum(sizes - 1, 0)]
    out[some, 0] = np.log1p((query_times[some] - newest[some]) / _HOUR_S)
    out[some, 5] = 1.0
    ages = np.asarray(query_times, dtype=np.float64)[:, None] - times
    windows = np.asarray(dims.windows_s, dtype=np.float64)[:, None, None]
    out[some, 6:] = np.log1p((ages[None] < windows).sum(axis=2)).T[some]
    return out
