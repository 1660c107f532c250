"""Turn users' histories into the ensembles' input tensors (pure; shared by sync and async).

What the server would reject is checked here first where the client can tell (times,
order, types, counts, UTF-8, image signatures), so a bad event fails fast with its field
and position instead of as a server error after a network round trip. The server's size
limits (dynemb.stages.preprocess.features: text, label and image bytes, declared pixels)
and images that do not decode are found by the server alone: INVALID_ARG naming the field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import np_to_triton_dtype

from dynemb_client.contract import (
    EVENT_COUNT,
    EVENT_IMAGE,
    EVENT_LABELS,
    EVENT_TEXT,
    EVENT_TIME,
    ITEM_IDS,
    ITEM_SCORES,
    ITEM_TITLES,
    MAX_TOP_K,
    QUERY_TIME,
    TOP_K,
    USER_EMBEDDING,
    version_output,
)
from dynemb_client.errors import ClientInputError
from dynemb_client.events import (
    Event,
    TimeLike,
    check_image,
    check_labels,
    image_bytes,
    text_bytes,
    to_unix_seconds,
)

__all__ = [
    "InferCall",
    "ModelShape",
    "build_inputs",
    "embedding_call",
    "exclusion_sets",
    "recommend_call",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The padded sizes the server was built with (read from its model metadata), and
    whether its `session` model answers SESSION_READ (one built before it does not)."""

    max_events: int
    max_labels: int
    session_read: bool = False


@dataclass(frozen=True)
class InferCall:
    """One ready-to-send request: the same object drives the sync and the async client."""

    model: str
    inputs: list[InferInput]
    outputs: list[InferRequestedOutput]
    batch: int
    # recommend only: item ids to leave out of each user's list (asked for k + len of them).
    exclude: tuple[frozenset[str], ...] = ()
    # False for a call that must not be sent twice (a session update: its events would
    # be added twice had a lost answer been applied).
    retry_safe: bool = True
    # Calls with the same route go to the same endpoint while it is healthy (a session's
    # state lives on one server); None: any endpoint, the least busy.
    route: str | None = None
    # The sessions whose state the call writes on the endpoint that answers it.
    sessions: tuple[str, ...] = ()
    # The stages whose versions the call asks for (their <STAGE>_VERSION outputs).
    stages: tuple[str, ...] = ()


def versions_asked(call: InferCall, stages: Sequence[str]) -> InferCall:
    """The same call, also asking which version of each of `stages` computed the answer."""
    asked = [InferRequestedOutput(version_output(stage)) for stage in stages]
    return replace(call, outputs=[*call.outputs, *asked], stages=tuple(stages))


@dataclass(frozen=True)
class _User:
    """One history after checks: kept events oldest first, at most max_events."""

    times: list[float]
    texts: list[bytes]
    images: list[bytes]
    labels: list[list[bytes]]
    query_time: float


def build_inputs(
    histories: Sequence[Sequence[Event]],
    at: Sequence[TimeLike | None],
    max_events: int,
    max_labels: int,
    top_k: int | None = None,
) -> dict[str, np.ndarray]:
    """The contract's input arrays for a batch of users (one row per history).

    Events are sorted by time (stable); events after the query time are dropped (the
    server ignores them, and they would push real context out of the window); then the
    most recent `max_events` are kept, real events first and padding after. The query
    time defaults to the newest event's time, or to now for an empty (cold-start) history.
    """
    if max_events < 1 or max_labels < 1:
        raise ValueError(f"max_events and max_labels must be >= 1, got {max_events}, {max_labels}")
    histories = list(histories)
    at = list(at)
    n = len(histories)
    if n == 0:
        raise ClientInputError(
            "no histories to send (a batch needs at least one user)", field=EVENT_COUNT
        )
    if len(at) != n:
        raise ClientInputError(f"{len(at)} query times for {n} histories", field=QUERY_TIME)
    _check_top_k(top_k)

    arrays = {
        EVENT_TEXT: np.full((n, max_events), b"", dtype=object),
        EVENT_IMAGE: np.full((n, max_events), b"", dtype=object),
        EVENT_LABELS: np.full((n, max_events, max_labels), b"", dtype=object),
        EVENT_TIME: np.zeros((n, max_events), dtype=np.float64),
        EVENT_COUNT: np.zeros((n, 1), dtype=np.int32),
        QUERY_TIME: np.zeros((n, 1), dtype=np.float64),
    }
    for row, (events, query) in enumerate(zip(histories, at, strict=True)):
        try:
            user = _prepare(events, query, max_events, max_labels)
        except ClientInputError as exc:
            if n == 1:
                raise
            raise ClientInputError(
                exc.reason, field=exc.field, index=exc.index, history=row
            ) from None
        count = len(user.times)
        arrays[EVENT_TEXT][row, :count] = user.texts
        arrays[EVENT_IMAGE][row, :count] = user.images
        arrays[EVENT_TIME][row, :count] = user.times
        for slot, labels in enumerate(user.labels):
            arrays[EVENT_LABELS][row, slot, : len(labels)] = labels
        arrays[EVENT_COUNT][row, 0] = count
        arrays[QUERY_TIME][row, 0] = user.query_time
    if top_k is not None:
        arrays[TOP_K] = np.full((n, 1), top_k, dtype=np.int32)
    return arrays


def _prepare(
    events: Sequence[Event], at: TimeLike | None, max_events: int, max_labels: int
) -> _User:
    if isinstance(events, Event) or not isinstance(events, Sequence):
        raise TypeError(
            f"a history must be a sequence of Event, not {type(events).__name__} "
            "(embed()/recommend() take one history, the *_many variants a list of them)"
        )
    times: list[float] = []
    checked: list[tuple[bytes, list[bytes], Path | bytes]] = []
    for index, event in enumerate(events):
        seconds, *content = check_event(event, index, max_labels)
        times.append(seconds)
        checked.append(tuple(content))  # type: ignore[arg-type]
    order = sorted(range(len(times)), key=times.__getitem__)  # sorted() is stable
    if at is not None:
        query_time = to_unix_seconds(at, field=QUERY_TIME)
    elif order:
        query_time = times[order[-1]]
    else:
        query_time = time.time()  # cold start: "interest now" with no history
    visible = [i for i in order if times[i] <= query_time]
    kept = visible[-max_events:]
    if len(kept) < len(order):
        logger.debug(
            "history of %d events: %d after the query time, %d older than the last %d dropped",
            len(order),
            len(order) - len(visible),
            len(visible) - len(kept),
            max_events,
        )
    return _User(
        times=[times[i] for i in kept],
        texts=[checked[i][0] for i in kept],
        images=[image_bytes(checked[i][2], i) for i in kept],
        labels=[checked[i][1] for i in kept],
        query_time=query_time,
    )


def check_event(
    event: object, index: int, max_labels: int
) -> tuple[float, bytes, list[bytes], Path | bytes]:
    """Event `index` of a history, checked as the server would check it: its time in unix
    seconds, its text as UTF-8 bytes, its labels as bytes, its image's path or bytes."""
    if not isinstance(event, Event):
        raise TypeError(f"event {index} is {type(event).__name__}, not dynemb_client.Event")
    return (
        to_unix_seconds(event.time, field=EVENT_TIME, index=index),
        text_bytes(event.text, index),
        check_labels(event.labels, max_labels, index),
        check_image(event.image, index),
    )


def _check_top_k(top_k: int | None) -> None:
    if top_k is None:
        return
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ClientInputError(f"k must be an int, not {type(top_k).__name__}", field=TOP_K)
    if not 1 <= top_k <= MAX_TOP_K:
        raise ClientInputError(f"k must be in 1..{MAX_TOP_K}, got {top_k}", field=TOP_K)


def broadcast_at(at: TimeLike | Sequence[TimeLike | None] | None, n: int) -> list[TimeLike | None]:
    """One query time per history from None, a single time, or one per history (a list,
    tuple or array of them; anything else is one time, checked where it is used)."""
    if isinstance(at, (list, tuple)) or (isinstance(at, np.ndarray) and at.ndim >= 1):
        return list(at)
    return [at] * n


def _to_infer_inputs(arrays: dict[str, np.ndarray]) -> list[InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def embedding_call(
    model: str,
    histories: Sequence[Sequence[Event]],
    at: TimeLike | Sequence[TimeLike | None] | None,
    shape: ModelShape,
) -> InferCall:
    """A `user_interest` request for a batch of users."""
    histories = list(histories)
    arrays = build_inputs(
        histories, broadcast_at(at, len(histories)), shape.max_events, shape.max_labels
    )
    return InferCall(
        model=model,
        inputs=_to_infer_inputs(arrays),
        outputs=[InferRequestedOutput(USER_EMBEDDING)],
        batch=len(histories),
    )


def recommend_call(
    model: str,
    histories: Sequence[Sequence[Event]],
    at: TimeLike | Sequence[TimeLike | None] | None,
    shape: ModelShape,
    k: int,
    exclude: Sequence[Iterable[str]] | None = None,
) -> InferCall:
    """A `recommend` request for a batch of users, asking for up to `k` items each.

    `exclude` holds, per user, item ids to leave out (e.g. what the user already had): the
    server is asked for k more items per excluded id (at most MAX_TOP_K) and
    `parse_recommendations` drops them, so up to k remain."""
    histories = list(histories)
    _check_top_k(k)
    excluded = exclusion_sets(exclude, len(histories))
    asked = min(MAX_TOP_K, k + max((len(ids) for ids in excluded), default=0))
    arrays = build_inputs(
        histories,
        broadcast_at(at, len(histories)),
        shape.max_events,
        shape.max_labels,
        top_k=asked,
    )
    return InferCall(
        model=model,
        inputs=_to_infer_inputs(arrays),
        outputs=[InferRequestedOutput(name) for name in (ITEM_IDS, ITEM_SCORES, ITEM_TITLES)],
        batch=len(histories),
        exclude=tuple(excluded),
    )


def exclusion_sets(exclude: Sequence[Iterable[str] | None] | None, n: int) -> list[frozenset[str]]:
    """One set of item ids per user (empty sets for None, the whole or a user's)."""
    if exclude is None:
        return [frozenset()] * n
    sets = []
    for i, ids in enumerate(exclude):
        if ids is None:  # as for the whole batch: nothing to leave out
            sets.append(frozenset())
            continue
        if isinstance(ids, (str, bytes)):
            raise ClientInputError(
                "exclude must hold a collection of item ids per user, not one id",
                field="exclude",
                history=i,
            )
        sets.append(frozenset(str(item) for item in ids))
    if len(sets) != n:
        raise ClientInputError(f"exclude has {len(sets)} entries for {n} users", field="exclude")
    return sets
