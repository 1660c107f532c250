"""Training and evaluation examples, built exactly as a served request is.

One example = (a user's history prefix, the query time t, the target item). The prefix is
turned into the wire tensors by `dynemb_client.build_inputs` and then into stage inputs by
the server's own `Preprocessor`, so the model is trained on what it is served.

Query time: t = the time of the target event, i.e. the moment the recommendation is asked.
It reveals no item. History events with the same timestamp as the target stay visible
(the Preprocessor keeps events with time <= t); the target itself never is, since only the
events *before* it in the user's time order are sent.

Text and images are the expensive inputs. Every event's text is also a row of a *text
table* (unique strings: item titles and event texts) and every image a row of an *image
table* (unique encoded images); the builder checks, example by example, that the
Preprocessor's token ids and pixels equal the table's rows, so the training model can run
text_rnn / image_cnn once per unique row and gather, and still compute what is served.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynemb.checkpoint import label_vocab
from dynemb.data.sent import event_labels, item_label, to_client_event
from dynemb.data.types import Dataset, Interaction
from dynemb.dims import Dims
from dynemb.evaluation.seen import seen_before
from dynemb.evaluation.split import Split, Which
from dynemb.stages.llm_encoder import tokenizer_json
from dynemb.stages.llm_encoder.sentences import sentence_embeddings
from dynemb.stages.preprocess.features import (
    PreprocessAssets,
    Preprocessor,
    build_label_vocab,
    query_features,
    time_features,
)
from dynemb_client import build_inputs


def training_vocab(dataset: Dataset, item_labels: bool) -> dict[str, int]:
    """`checkpoint.label_vocab`, plus one "item:<id>" label per item when ids are used."""
    vocab = label_vocab(dataset)
    if not item_labels:
        return vocab
    labels = [k for k in vocab if not k.startswith("<")]
    labels += [item_label(i) for i in dataset.items]
    labels += [item_label(e.item_id) for e in dataset.interactions]
    return build_label_vocab(labels)


@dataclass
class Tables:
    """Unique texts and images, preprocessed once (row 0 = no text / no image)."""

    token_ids: np.ndarray  # (n_texts, T) int64
    token_count: np.ndarray  # (n_texts,) int64
    pixels: np.ndarray  # (n_images, 3, S, S) uint8
    text_index: dict[str, int]
    image_index: dict[str, int]  # sha1 of the encoded bytes -> row


@dataclass
class ItemInputs:
    """Per item (row i = item index i+1): where its title and image live, its labels."""

    text: np.ndarray  # (n_items,) int64 row of Tables.token_ids
    image: np.ndarray  # (n_items,) int64 row of Tables.pixels, 0 = none
    image_mask: np.ndarray  # (n_items,) bool
    label_ids: np.ndarray  # (n_items, M) int64
    title: np.ndarray  # (n_items, SENTENCE_DIM) float32: the title's sentence embedding


@dataclass
class Example:
    """One preprocessed request, stored compactly (text/image as table rows)."""

    text: np.ndarray  # (L,) int32
    image: np.ndarray  # (L,) int32
    image_mask: np.ndarray  # (L,) bool
    label_ids: np.ndarray  # (L, M) int32
    time_features: np.ndarray  # (L, time_dim) float32
    query_features: np.ndarray  # (Q,) float32
    event_mask: np.ndarray  # (L,) bool
    target: int  # item index 1..n_items
    count: int


def _image_key(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class ExampleBuilder:
    """Builds (and caches) examples of one split; features depend only on prefix and t."""

    def __init__(self, dataset: Dataset, split: Split, dims: Dims, item_labels: bool) -> None:
        self.dims = dims
        self.split = split
        self.item_labels = item_labels
        self.labels = training_vocab(dataset, item_labels)
        self.assets = PreprocessAssets(dims, self.labels, tokenizer_json())
        self.preprocessor = Preprocessor(self.assets)
        self.tables = self._tables(dataset)
        self.items = self._item_inputs(dataset)
        self._cache: dict[tuple, Example] = {}

    def _tables(self, dataset: Dataset) -> Tables:
        texts = {"": 0}
        images = {"": 0}
        encoded: list[bytes] = [b""]
        records = [(i.title, i.image) for i in dataset.items.values()]
        records += [(e.text, e.image) for e in dataset.interactions]
        for text, image in records:
            texts.setdefault(text, len(texts))
            if image:
                key = _image_key(image)
                if key not in images:
                    images[key] = len(images)
                    encoded.append(image)
        token_ids, token_count = self.preprocessor.tokens(list(texts), len(texts))
        pixels, _ = self.preprocessor.images(
            encoded, len(encoded), keep=len(encoded), one_user=False
        )
        return Tables(token_ids, token_count, pixels, texts, images)

    def _item_inputs(self, dataset: Dataset) -> ItemInputs:
        ids = self.split.item_ids[1:]
        items = [dataset.items[i] for i in ids]
        t = self.tables
        image = [t.image_index[_image_key(i.image)] if i.image else 0 for i in items]
        return ItemInputs(
            text=np.array([t.text_index[i.title] for i in items], np.int64),
            image=np.array(image, np.int64),
            image_mask=np.array(image, np.int64) > 0,
            label_ids=self.preprocessor.label_ids([list(i.labels) for i in items], len(items)),
            title=sentence_embeddings([i.title for i in items]),
        )

    def raw_inputs(self, history: list[Interaction], query_time: float) -> dict[str, np.ndarray]:
        """The wire tensors a client sends for this history and t (one user, no batch axis)."""
        d = self.dims
        events = [to_client_event(e, d.max_labels, self.item_labels) for e in history]
        arrays = build_inputs([events], [query_time], d.max_events, d.max_labels)
        return {k: v[0] for k, v in arrays.items()}

    def example(
        self, user: int, cut: int, query_time: float | None = None, limit: int | None = None
    ) -> Example:
        """History = the user's events before index `cut`; target = event `cut`.

        `query_time` defaults to the target's time; a different t (e.g. a stale one) is
        used by the dynamics benchmark. `limit` keeps only the newest `limit` events (the
        short-history cold-start measurement).
        """
        events = self.split.events[user]
        target = events[cut]
        t = target.time if query_time is None else query_time
        key = (user, cut, t, limit)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        # What build_inputs would keep anyway: events at or before t, the newest L of them.
        history = self.newest([e for e in events[:cut] if e.time <= t], limit)
        x = self.preprocessor.user(self.raw_inputs(history, t))
        example = self._compact(x, history, self.split.item_index[target.item_id])
        self._cache[key] = example
        return example

    def _compact(self, x: dict[str, np.ndarray], history: list[Interaction], target: int):
        d, t = self.dims, self.tables
        count = int(x["EVENT_MASK"].sum())
        text = np.zeros(d.max_events, np.int32)
        image = np.zeros(d.max_events, np.int32)
        for i, event in enumerate(history[:count]):
            text[i] = t.text_index[event.text]
            image[i] = t.image_index[_image_key(event.image)] if event.image else 0
        # The gather must reproduce the Preprocessor's own tensors exactly.
        mask = x["IMAGE_MASK"]
        if not (
            np.array_equal(x["TOKEN_IDS"], t.token_ids[text])
            and np.array_equal(x["TOKEN_COUNT"], t.token_count[text])
            and np.array_equal(mask, image > 0)
            and np.array_equal(x["IMAGE_PIXELS"][mask], t.pixels[image[mask]])
        ):
            raise AssertionError("text/image tables disagree with the Preprocessor")
        return Example(
            text=text,
            image=image,
            image_mask=x["IMAGE_MASK"].copy(),
            label_ids=x["LABEL_IDS"].astype(np.int32),
            time_features=x["TIME_FEATURES"],
            query_features=x["QUERY_FEATURES"],
            event_mask=x["EVENT_MASK"].copy(),
            target=target,
            count=count,
        )

    def windows(self, user: int, mode: str = "last") -> list[Window]:
        """Training windows of a user: runs of up to L+1 consecutive *training* events.

        A window's first n <= L events are the inputs; its output k (k = 0..n) is E after
        the first k of them, asked at the time of event k+1, whose item is the target. So
        every output is a request the server could be sent (those k events, that t) and
        `TrainModel.window_embeddings` computes what the server would answer. Output 0 (no
        history) has a target only in the window that starts at the user's first event.

        mode "last": one window, the newest L+1 training events (SASRec's choice).
        mode "all": windows cut from the newest backwards so that every training event is
        a target exactly once.
        """
        events = self.split.events[user][: len(self.split.train[user])]
        width = self.dims.max_events + 1
        ends = [len(events)]
        if mode == "all":
            while ends[-1] - width > 0:
                ends.append(ends[-1] - width + 1)
        elif mode != "last":
            raise ValueError(f"unknown window mode {mode!r}")
        items = self.split.train[user]  # the item indices of `events`
        return [self._window(events, items, max(0, end - width), end) for end in ends if end >= 2]

    def _window(self, events: list[Interaction], items: np.ndarray, start: int, end: int) -> Window:
        d, t = self.dims, self.tables
        run = events[start:end]
        inputs = run[:-1]
        n = len(inputs)
        labels = [list(event_labels(e, d.max_labels, self.item_labels)) for e in inputs]
        times = np.array([e.time for e in run], np.float64)
        text = np.zeros(d.max_events, np.int32)
        image = np.zeros(d.max_events, np.int32)
        for i, event in enumerate(inputs):
            text[i] = t.text_index[event.text]
            image[i] = t.image_index[_image_key(event.image)] if event.image else 0
        targets = items[start:end].astype(np.int64)  # a copy: targets[0] may be zeroed
        if start > 0:
            targets[0] = 0  # an empty history in mid-sequence is not a real request
        return Window(
            text=text,
            image=image,
            image_mask=image > 0,
            label_ids=self.preprocessor.label_ids(labels, d.max_events).astype(np.int32),
            time_features=time_features(times[:n], labels, d),
            query_features=np.stack([query_features(times[:k], times[k], d) for k in range(n + 1)]),
            targets=targets,
            count=n,
            history=items[: end - 1],
            start=start,
        )

    def train_cuts(self, user: int) -> range:
        """Cut points whose target is a training event (never validation or test)."""
        return range(1, len(self.split.train[user]))

    def newest(self, history: Sequence, limit: int | None) -> Sequence:
        """The events of `history` (a list or an array, oldest first) that an example
        reads: the newest L, which build_inputs keeps anyway, or the newest `limit` if
        fewer (0: none)."""
        k = self.dims.max_events if limit is None else min(limit, self.dims.max_events)
        return history[-k:] if k else history[:0]

    def eval_cut(self, user: int, which: Which) -> int:
        """The index of the held-out event in the user's events."""
        n = len(self.split.events[user])
        return n - 2 if which == "valid" else n - 1


@dataclass
class Window:
    """A run of consecutive training events scored at every prefix (see
    `ExampleBuilder.windows`); per-event arrays padded to L, per-output arrays n + 1 long."""

    text: np.ndarray  # (L,) int32
    image: np.ndarray  # (L,) int32
    image_mask: np.ndarray  # (L,) bool
    label_ids: np.ndarray  # (L, M) int32
    time_features: np.ndarray  # (L, time_dim) float32
    query_features: np.ndarray  # (n + 1, Q) float32: row k = features of t after k events
    targets: np.ndarray  # (n + 1,) int64 item index, 0 = no target
    count: int  # n, real input events
    # The user's item indices up to the window's last input, from their first training event
    # (also those before the window): output k's target follows history[: start + k].
    history: np.ndarray
    start: int


@dataclass
class Batch:
    """Stacked examples as numpy arrays (torch conversion happens in the model)."""

    text: np.ndarray
    image: np.ndarray
    image_mask: np.ndarray
    label_ids: np.ndarray
    time_features: np.ndarray
    query_features: np.ndarray
    event_mask: np.ndarray
    target: np.ndarray


def collate(examples: list[Example]) -> Batch:
    """Stack, and cut trailing padding shared by the whole batch (exact: padding is last,
    the LSTM is causal and the encoder masks padded keys and pools real tokens only)."""
    length = max(1, max(e.count for e in examples))
    return Batch(
        text=np.stack([e.text[:length] for e in examples]).astype(np.int64),
        image=np.stack([e.image[:length] for e in examples]).astype(np.int64),
        image_mask=np.stack([e.image_mask[:length] for e in examples]),
        label_ids=np.stack([e.label_ids[:length] for e in examples]).astype(np.int64),
        time_features=np.stack([e.time_features[:length] for e in examples]),
        query_features=np.stack([e.query_features for e in examples]),
        event_mask=np.stack([e.event_mask[:length] for e in examples]),
        target=np.array([e.target for e in examples], np.int64),
    )


def seen_items(windows: list[Window], n_items: int) -> np.ndarray:
    """(B, n + 1, n_items) bool, aligned with `collate_windows`: row k of window i marks the
    items its user had before output k's target (`dynemb.evaluation.seen`)."""
    length = max(w.count for w in windows)
    out = np.zeros((len(windows), length + 1, n_items), bool)
    for i, w in enumerate(windows):
        out[i, : w.count + 1] = seen_before(w.history, w.start + np.arange(w.count + 1), n_items)
    return out


def collate_windows(windows: list[Window]) -> Batch:
    """Stack windows into a Batch whose query features and targets have one row per prefix
    (B, n + 1, ...), cut to the longest window; padded outputs have target 0."""
    length = max(w.count for w in windows)
    query = np.zeros((len(windows), length + 1, windows[0].query_features.shape[1]), np.float32)
    targets = np.zeros((len(windows), length + 1), np.int64)
    for i, w in enumerate(windows):
        query[i, : w.count + 1] = w.query_features
        targets[i, : w.count + 1] = w.targets
    return Batch(
        text=np.stack([w.text[:length] for w in windows]).astype(np.int64),
        image=np.stack([w.image[:length] for w in windows]).astype(np.int64),
        image_mask=np.stack([w.image_mask[:length] for w in windows]),
        label_ids=np.stack([w.label_ids[:length] for w in windows]).astype(np.int64),
        time_features=np.stack([w.time_features[:length] for w in windows]),
        query_features=query,
        event_mask=np.arange(length)[None, :] < np.array([w.count for w in windows])[:, None],
        target=targets,
    )
