"""The request sets every variant of the serving benchmark is given: the same users, the
same events, in the same order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dynemb.data import load_dataset
from dynemb.data.synthetic import SyntheticConfig, generate
from dynemb.dims import DIMS
from dynemb.queries import event_converter
from dynemb_client import Event


@dataclass(frozen=True)
class HistorySet:
    name: str  # short, used in result keys: "ml-100k", "synthetic-images"
    description: str  # what the numbers were measured on (SYNTHETIC said where it applies)
    synthetic: bool
    users: list[list[Event]]  # newest L events of each user, oldest first
    at: list[float]  # each user's query time: the time of their newest event

    def __len__(self) -> int:
        return len(self.users)


def movielens(
    repository: Path, cache: Path, max_users: int | None = None, events: int = DIMS.max_events
) -> HistorySet:
    """MovieLens-100k users' newest `events` events (default L), sent as the served model
    was trained to read them (dynemb.queries.event_converter), no images. With `events`
    above L only users with at least that many are taken (streams past the window)."""
    convert = event_converter(repository)
    users = load_dataset("ml-100k", cache).by_user()
    long_enough = [u for u in sorted(users) if events <= DIMS.max_events or len(users[u]) >= events]
    chosen = long_enough[:max_users] if max_users else long_enough
    histories = [[convert(e) for e in users[u][-events:]] for u in chosen]
    return HistorySet(
        "ml-100k",
        f"MovieLens-100k: {len(histories)} users' newest {events} events "
        "(titles, genres, ratings; no images)",
        False,
        histories,
        [h[-1].time for h in histories],
    )


def synthetic_with_images(
    n_users: int = 256, seed: int = 7, events: int = DIMS.max_events
) -> HistorySet:
    """SYNTHETIC users (dynemb.data.synthetic, seeded) with drawn images on their items,
    their newest `events` events (default L)."""
    low = max(50, events)
    config = SyntheticConfig(n_users=n_users, events_per_user=(low, low + 30), seed=seed)
    histories = [
        [Event(e.time, e.text, e.image, e.labels) for e in history[-events:]]
        for history in generate(config).dataset.by_user().values()
    ]
    return HistorySet(
        "synthetic-images",
        f"SYNTHETIC: {len(histories)} generated users' newest {events} events, "
        "each item with a drawn 32x32 image",
        True,
        histories,
        [h[-1].time for h in histories],
    )
