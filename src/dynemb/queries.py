"""Ask a running server about the users of an events file (`dynemb embed`, `dynemb
recommend`), sending their histories as the served model was trained to read them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynemb.data.jsonl import DataError, iso_seconds, iter_user_events
from dynemb.data.sent import labels_cut, to_client_event
from dynemb.data.types import Interaction
from dynemb.errors import UsageError
from dynemb.pipeline import serving_manifests
from dynemb_client import (
    ClientInputError,
    Event,
    InterestClient,
    Recommendation,
    ServerInputError,
    ServerUnavailable,
)
from dynemb_client.contract import MAX_TOP_K
from dynemb_client.events import to_unix_seconds
from dynemb_client.requests import check_event

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventConverter:
    """Interaction -> client Event as the served model was trained to read it (with the
    "item:<id>" label if its training used one), labels cut to the model's M."""

    max_labels: int  # M of the served model
    item_labels: bool

    def __call__(self, event: Interaction) -> Event:
        return to_client_event(event, self.max_labels, self.item_labels)

    def cuts(self, event: Interaction) -> bool:
        """Whether the event is sent without some of its own labels."""
        return labels_cut(event, self.max_labels, self.item_labels)


def event_converter(repository: Path) -> EventConverter:
    """The EventConverter of the repository's served model (its manifests read once). A
    folder with no built stage is refused: without its manifests, events would go without
    the item-id labels a model trained with them reads, and the answers would silently
    depend on the folder the command ran in."""
    manifests = list(serving_manifests(repository).values())
    if not manifests:
        raise UsageError(
            f"--repository {repository}: no built model repository there; it says how the "
            "served model reads events (its M labels, an item id as the label item:<id>): "
            "pass the served repository, or a copy of it"
        )
    return EventConverter(
        max_labels=manifests[0].dims.max_labels,
        item_labels=any(m.provenance.item_labels for m in manifests),
    )


@dataclass(frozen=True)
class UserEmbedding:
    user: str
    at: float  # the query time E_t is for
    embedding: np.ndarray


@dataclass(frozen=True)
class UserRecommendations:
    user: str
    at: float
    items: list[Recommendation]


def _histories(
    events: Path, user: str | None, repository: Path
) -> list[tuple[str, list[Interaction], list[Event]]]:
    """Every user's history as the client sends it, each event checked as the client
    checks it: all of the file is read and checked before anything is asked or printed."""
    users = list(iter_user_events(events, user))  # the file's own errors first
    convert = event_converter(repository)
    out = []
    cut: list[tuple[str, float]] = []
    for user_id, interactions in users:
        history = [convert(e) for e in interactions]
        cut += [(user_id, e.time) for e in interactions if convert.cuts(e)]
        for index, event in enumerate(history):
            try:
                check_event(event, index, convert.max_labels)
            except ClientInputError as exc:
                raise DataError(
                    f"{events}: user {user_id!r}, event at {interactions[index].time}: {exc.reason}"
                ) from None
        out.append((user_id, interactions, history))
    if cut:
        first_user, first_time = cut[0]
        logger.warning(
            "%s: %d event(s) carry more labels than the model reads (%d%s); each is read "
            "without its last ones, as in training (the first: user %r at %s)",
            events,
            len(cut),
            convert.max_labels,
            ", the item's id label first" if convert.item_labels else "",
            first_user,
            first_time,
        )
    return out


def _client(url: str, model: str) -> InterestClient:
    """A client of `url` once it answers: a server that is not up is one line at once (the
    client alone would retry for its 30 s deadline, a warning a retry)."""
    client = InterestClient(url)
    if not client.is_ready():
        client.close()
        raise ServerUnavailable(
            f"no server ready at {url} (start one with `dynemb serve`, or pass --url)",
            model=model,
            url=url,
        )
    return client


def _query_time(at: str | float | None) -> float | None:
    """--at as unix seconds: a number, or an ISO-8601 time as the events' may be."""
    if at is None:
        return None
    if isinstance(at, str):
        if len(at) == 8 and at.isdigit() and _is_iso(at):
            # Unix seconds in 1970, or ISO-8601's basic date: read as seconds it was a
            # query before every event, every user's E_t that of an empty history.
            raise UsageError(
                f"--at {at} is ambiguous: the date {at[:4]}-{at[4:6]}-{at[6:]}, or unix "
                f"seconds in 1970; write {at[:4]}-{at[4:6]}-{at[6:]} for the date "
                f"or {at}.0 for the seconds"
            )
        try:
            at = float(at)
        except ValueError:
            try:
                at = iso_seconds(at)
            except ValueError:
                raise UsageError(
                    f"--at must be unix seconds or an ISO-8601 time, got {at!r}"
                ) from None
    try:
        return to_unix_seconds(at, field="--at")
    except ClientInputError as exc:
        raise UsageError(f"--at: {exc.reason}") from None


def _is_iso(text: str) -> bool:
    try:
        iso_seconds(text)
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def _naming_the_user(events: Path, user_id: str) -> Iterator[None]:
    """A refusal of the server's (a limit only it checks, e.g. an image's pixels) names
    the file and the user, whose events it was."""
    try:
        yield
    except ServerInputError as exc:
        raise DataError(f"{events}: user {user_id!r}: {exc.reason}") from None


def embed_events(
    events: Path, user: str | None, at: str | float | None, url: str, repository: Path
) -> list[UserEmbedding]:
    """E_t of each user of `events` (or only `user`), at `at` or their newest event; all
    of them answered before any is returned, so that nothing is printed before an error
    (one the server found in a later user's events had followed earlier users' lines)."""
    at = _query_time(at)
    histories = _histories(events, user, repository)
    out = []
    with _client(url, "user_interest") as client:
        for user_id, interactions, history in histories:
            t = interactions[-1].time if at is None else at
            with _naming_the_user(events, user_id):
                out.append(UserEmbedding(user_id, t, client.embed(history, at=t)))
    return out


def recommend_events(
    events: Path,
    user: str | None,
    at: str | float | None,
    k: int,
    exclude_seen: bool,
    url: str,
    repository: Path,
) -> list[UserRecommendations]:
    """Top-k items of each user of `events`; with `exclude_seen`, none of the items of the
    history sent (the model is trained to rank the items a user has not had). All users
    are answered before any is returned (see `embed_events`)."""
    if not 1 <= k <= MAX_TOP_K:
        raise UsageError(f"--k must be in 1..{MAX_TOP_K}, got {k}")
    at = _query_time(at)
    histories = _histories(events, user, repository)
    out = []
    with _client(url, "recommend") as client:
        for user_id, interactions, history in histories:
            seen = {e.item_id for e in interactions} if exclude_seen else set()
            t = interactions[-1].time if at is None else at
            with _naming_the_user(events, user_id):
                items = client.recommend(history, k=k, at=t, exclude=seen)
            out.append(UserRecommendations(user_id, t, items))
    return out


def served_versions(url: str, timeout_s: float = 10.0) -> dict[str, int]:
    """Stage -> the version a server's `recommend` answers from now: what it reports for
    one cold-start request (a probe, never retried: an operator asks about this server)."""
    with InterestClient(url, retries=0, timeout_s=timeout_s) as client:
        return dict(client.recommend_many_versioned([[]], k=1).versions)
