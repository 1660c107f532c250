"""An interaction as a client sends it to the served model: the item's id as the label
"item:<id>" first when the model was trained with id labels, then the event's own labels,
cut to the model's M. Training builds its examples through the same functions, so the
model reads what it is sent (dynemb.training.examples); `dynemb embed` and `embed-all`
convert an events file with them (dynemb.queries)."""

from __future__ import annotations

from dynemb.data.types import Interaction
from dynemb_client import Event

ITEM_LABEL_PREFIX = "item:"


def item_label(item_id: str) -> str:
    """The user-side id label of an event ("item:<id>"), when training uses them."""
    return f"{ITEM_LABEL_PREFIX}{item_id}"


def _uncut(event: Interaction, item_labels: bool) -> tuple[str, ...]:
    return (item_label(event.item_id), *event.labels) if item_labels else tuple(event.labels)


def event_labels(event: Interaction, max_labels: int, item_labels: bool) -> tuple[str, ...]:
    """Labels as sent: the item label first (if used), then the event's own, cut to M."""
    return _uncut(event, item_labels)[:max_labels]


def labels_cut(event: Interaction, max_labels: int, item_labels: bool) -> bool:
    """Whether `event_labels` leaves out some of the event's own labels."""
    return len(_uncut(event, item_labels)) > max_labels


def to_client_event(event: Interaction, max_labels: int, item_labels: bool) -> Event:
    """The `dynemb_client.Event` a client sends for this interaction (demo histories too)."""
    return Event(
        time=event.time,
        text=event.text,
        image=event.image,
        labels=event_labels(event, max_labels, item_labels),
    )
