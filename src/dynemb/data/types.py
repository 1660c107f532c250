"""Plain records every data source produces: a catalogue of items and timed interactions."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str
    labels: tuple[str, ...] = ()  # e.g. ("genre:Comedy", "category:shoes")
    image: bytes | None = None  # encoded PNG/JPEG, or None


@dataclass(frozen=True)
class Interaction:
    """One event of one user. `text`/`labels`/`image` describe what the user met."""

    user_id: str
    item_id: str
    time: float  # unix seconds
    text: str
    labels: tuple[str, ...] = ()  # item labels plus e.g. "rating:4", "action:watch"
    image: bytes | None = None
    rating: float | None = None


@dataclass
class Dataset:
    name: str
    items: dict[str, Item]
    interactions: list[Interaction]  # sorted by (user_id, time, original order)
    synthetic: bool = False
    meta: dict[str, str] = field(default_factory=dict)

    def by_user(self) -> dict[str, list[Interaction]]:
        """Each user's interactions in time order (ties keep the source order)."""
        users: dict[str, list[Interaction]] = {}
        for event in self.interactions:
            users.setdefault(event.user_id, []).append(event)
        return users
