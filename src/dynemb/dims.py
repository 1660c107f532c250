"""Model dimensions shared by every stage, the client contract and the generated configs.

One frozen dataclass so that a change of window length or width is one edit, seen in the
diffs of the committed `config.pbtxt` files. Checkpoints and manifests store the dims
they were built with (`to_json`) and load with exactly those (`from_json`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

# Trailing windows for the sliding-window statistics of each event (seconds).
WINDOWS_S: tuple[int, ...] = (3_600, 86_400, 7 * 86_400, 30 * 86_400)


@dataclass(frozen=True)
class Dims:
    max_events: int = 50  # L: events per user, most recent last
    max_tokens: int = 16  # T: word pieces per event text
    max_labels: int = 8  # M: labels per event
    image_size: int = 32  # S: images are resized to S x S RGB
    text_dim: int = 64
    image_dim: int = 64
    label_dim: int = 32
    seq_dim: int = 128  # F_t width (temporal LSTM hidden size)
    embed_dim: int = 128  # D: width of E_t and of the item table
    max_top_k: int = 100
    windows_s: tuple[int, ...] = WINDOWS_S

    @property
    def event_dim(self) -> int:
        """Width of G, the per-event feature text ⊕ image ⊕ label."""
        return self.text_dim + self.image_dim + self.label_dim

    @property
    def time_dim(self) -> int:
        """Per-event time features (see dynemb.stages.preprocess.features.time_features)."""
        # time since the first event, gap to previous, hour sin/cos, weekday sin/cos,
        # position, then per window: log count, mean rating, share of the event's first label.
        return 7 + 3 * len(self.windows_s)

    @property
    def query_dim(self) -> int:
        """Features of the query time t itself (see ...preprocess.features.query_features)."""
        # gap since last event, hour sin/cos, weekday sin/cos, has-history, per window: log count.
        return 6 + len(self.windows_s)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Dims:
        """The inverse of `to_json`; an unknown or missing field is an error, not a default."""
        names = {f.name for f in fields(cls)}
        if set(raw) != names:
            unknown, missing = sorted(set(raw) - names), sorted(names - set(raw))
            raise ValueError(f"dims: unknown fields {unknown}, missing fields {missing}")
        return cls(**{**raw, "windows_s": tuple(raw["windows_s"])})

    def differences(self, other: Dims) -> list[str]:
        """'field: mine != theirs' for every field that differs."""
        return [
            f"{f.name}: {getattr(self, f.name)} != {getattr(other, f.name)}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


DIMS = Dims()
