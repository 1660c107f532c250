"""Ask a running server about the users of an events file (`dynemb embed`, `dynemb
recommend`), sending their histories as the served model was trained to read them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynemb.data.jsonl import iter_user_events
from dynemb.data.types import Interaction
from dynemb.dims import DIMS
from dynemb.pipeline import serving_manifests
from dynemb_client import Event, InterestClient, Recommendation


def event_converter(repository: Path) -> Callable[[Interaction], Event]:
    """Interaction -> client Event as the served model was trained to read it (with the
    "item:<id>" label if its training used one), labels cut to the model's M."""
    from dynemb.training.examples import to_client_event

    manifests = list(serving_manifests(repository).values())
    item_labels = any(m.provenance.item_labels for m in manifests)
    max_labels = manifests[0].dims.max_labels if manifests else DIMS.max_labels
    return lambda e: to_client_event(e, max_labels, item_labels)


@dataclass(frozen=True)
class UserEmbedding:
    user: str
    embedding: np.ndarray


@dataclass(frozen=True)
class UserRecommendations:
    user: str
    items: list[Recommendation]


def _histories(
    events: Path, user: str | None, repository: Path
) -> Iterator[tuple[str, list[Interaction], list[Event]]]:
    convert = event_converter(repository)
    for user_id, interactions in iter_user_events(events, user):
        yield user_id, interactions, [convert(e) for e in interactions]


def embed_events(
    events: Path, user: str | None, at: float | None, url: str, repository: Path
) -> Iterator[UserEmbedding]:
    """E_t of each user of `events` (or only `user`), at `at` or their newest event."""
    with InterestClient(url) as client:
        for user_id, _, history in _histories(events, user, repository):
            yield UserEmbedding(user_id, client.embed(history, at=at))


def recommend_events(
    events: Path,
    user: str | None,
    at: float | None,
    k: int,
    exclude_seen: bool,
    url: str,
    repository: Path,
) -> Iterator[UserRecommendations]:
    """Top-k items of each user of `events`; with `exclude_seen`, none of the items of the
    history sent (the model is trained to rank the items a user has not had)."""
    with InterestClient(url) as client:
        for user_id, interactions, history in _histories(events, user, repository):
            seen = {e.item_id for e in interactions} if exclude_seen else set()
            yield UserRecommendations(user_id, client.recommend(history, k=k, at=at, exclude=seen))


def served_versions(url: str, timeout_s: float = 10.0) -> dict[str, int]:
    """Stage -> the version a server's `recommend` answers from now: what it reports for
    one cold-start request (a probe, never retried: an operator asks about this server)."""
    with InterestClient(url, retries=0, timeout_s=timeout_s) as client:
        return dict(client.recommend_many_versioned([[]], k=1).versions)
