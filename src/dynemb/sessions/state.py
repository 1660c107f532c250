"""What a session keeps per user, and the store that bounds how many it keeps.

A session's state is exactly what the next event needs and no more: the events' times
and labels (the time features of a new event read the events before it), their per-item
vectors G (to re-window past L events), the LSTM state, MiniLM's keys and values of every
token read, and the newest token's state. It is tagged with the stage versions that
computed it: a state is only ever advanced by the same versions (`StateStore.get`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from dynemb.stages.preprocess.features import label_row_bytes

# (stage, version) of every stage a state was computed with, in session wiring order.
Versions = tuple[tuple[str, str], ...]


def check_block(block: int, max_events: int) -> None:
    """A re-window block is 1 to L events."""
    if not 1 <= block <= max_events:
        raise ValueError(f"rewindow_block must be in [1, {max_events}], got {block}")


def window_after(held: int, new: int, max_events: int, block: int) -> int:
    """How many events a session's window holds after `new` events reach a window of
    `held`: as if they arrived one at a time, each joining the window until it holds L
    (`max_events`) events, and one more then re-windowing it to its newest L - B + 1
    (B = `block`). So a window of L that streams on holds L - B + 1, ..., L events in
    turn, and E_t is always the embedding of exactly the window's events.

    B = 1 keeps the newest L events always (every event past L recomputes the sequence
    part over L events); a larger B recomputes once every B events, over fewer, and steps
    in between. The count depends only on `held + new`, never on how the events were
    grouped into updates (for held <= L): window_after(0, held + new) equals it.
    """
    check_block(block, max_events)
    total = held + new
    if total <= max_events:
        return total
    return max_events - block + 1 + (total - max_events - 1) % block


@dataclass(eq=False)
class KVRoom:
    """MiniLM's keys and values with room to grow: (layers, heads, capacity, head_dim)
    buffers whose first `tip` tokens are written. States hold views of their first n.
    A state whose n is the tip appends in place: only positions at or past the tip are
    ever written, so no view of n <= tip changes, and an older state of the session
    still reads what it read. Another state's append copies into a new room."""

    keys: np.ndarray
    values: np.ndarray
    tip: int

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def appended(
    base: SessionState | None, new_keys: np.ndarray, new_values: np.ndarray, limit: int
) -> tuple[np.ndarray, np.ndarray, KVRoom]:
    """`base`'s keys and values (None: a session from nothing) followed by `new_keys` and
    `new_values` (layers, heads, r, head_dim): views of a room that holds them all. That
    is base's own room when base was its newest and there is space; else a new room,
    with space to double up to `limit` tokens (L + 1: no window reads more)."""
    held = base.keys.shape[2] if base is not None else 0
    room = base.room if base is not None else None
    total = held + new_keys.shape[2]
    if room is None or room.tip != held or room.keys.shape[2] < total:
        layers, heads, _, head_dim = new_keys.shape
        shape = (layers, heads, max(total, min(limit, max(2 * total, 16))), head_dim)
        room = KVRoom(np.empty(shape, np.float32), np.empty(shape, np.float32), held)
        if base is not None:
            room.keys[:, :, :held], room.values[:, :, :held] = base.keys, base.values
    room.keys[:, :, held:total], room.values[:, :, held:total] = new_keys, new_values
    room.tip = total
    return room.keys[:, :, :total], room.values[:, :, :total], room


@dataclass
class SessionState:
    versions: Versions
    times: np.ndarray  # (n,) float64, non-decreasing
    labels: list[list[str]]  # n events' labels, as strings
    ratings: np.ndarray  # (n,) float64, NaN where unrated (from the labels)
    events: np.ndarray  # (n, event_dim) float32: G = text ⊕ image ⊕ label vectors
    lstm_h: np.ndarray  # (seq_dim,) float32
    lstm_c: np.ndarray  # (seq_dim,) float32
    keys: np.ndarray  # (layers, heads, n + 1, head_dim) float32: start token + n events
    values: np.ndarray  # same
    newest: np.ndarray  # (hidden,) float32: the state of the newest token
    # A full window (L events): recomputed whole from `events` on every change, so the
    # LSTM state, keys, values and newest state are not kept (empty).
    windowed: bool = False
    # Events the session has read since it was started (its window holds the newest
    # n_events of them): answered with each update, so that a client can tell that
    # another writer added events it does not keep (dynemb_client.sessions).
    read: int = 0
    used_at: float = 0.0  # monotonic time of the last use (TTL)
    room: KVRoom | None = None  # what `keys` and `values` are views of, if anything
    # label_row_bytes(labels), if its maker counted them (a step adds its new rows' to its
    # base's); else counted when first asked for.
    label_bytes: int | None = None

    @property
    def n_events(self) -> int:
        return len(self.times)

    @cached_property
    def labels_nbytes(self) -> int:
        """label_row_bytes(labels), as its maker counted them or counted now."""
        if self.label_bytes is not None:
            return self.label_bytes
        return label_row_bytes(self.labels)

    @cached_property
    def nbytes(self) -> int:
        """Its size, once: a state is not changed after it is made, and the store reads the
        size on every put and drop. Its labels are counted by a step for its new rows only:
        summed label by label over 50 events, they were 5% of a served update."""
        arrays = (self.times, self.ratings, self.events, self.lstm_h, self.lstm_c, self.newest)
        kv = self.room.nbytes if self.room is not None else self.keys.nbytes + self.values.nbytes
        return sum(a.nbytes for a in arrays) + kv + self.labels_nbytes + 512


@dataclass(frozen=True)
class StoreStats:
    users: int = 0
    bytes: int = 0
    hits: int = 0
    misses: int = 0  # no state for the session (never seen, evicted, forgotten)
    stale: int = 0  # a state from other stage versions, dropped when asked for
    evictions: int = 0  # dropped to stay within max_users / max_bytes
    expirations: int = 0  # dropped after ttl_s unused


@dataclass
class StateStore:
    """Sessions by id, least recently used first; bounded in users and bytes, and a state
    unused for `ttl_s` is dropped. Only the session model's one instance touches it."""

    max_users: int = 100_000
    max_bytes: int = 1 << 30
    ttl_s: float = 3_600.0
    clock: Callable[[], float] = time.monotonic
    _states: OrderedDict[str, SessionState] = field(default_factory=OrderedDict)
    _bytes: int = 0
    _counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("hits", "misses", "stale", "evictions", "expirations"), 0
        )
    )

    def get(self, session: str, versions: Versions) -> SessionState | None:
        """The session's state if it was computed by exactly `versions`, else None (a state
        from other versions is dropped: it must never be advanced by these)."""
        self.expire()
        state = self._states.get(session)
        if state is None:
            self._counts["misses"] += 1
            return None
        if state.versions != versions:
            self._drop(session)
            self._counts["stale"] += 1
            return None
        self._counts["hits"] += 1
        self._states.move_to_end(session)
        state.used_at = self.clock()
        return state

    def peek(self, session: str) -> SessionState | None:
        """The session's state, if held, as it is: no use recorded, nothing counted."""
        return self._states.get(session)

    def put(self, session: str, state: SessionState) -> None:
        """Keep `state` (replacing the session's old one); drop the expired ones and evict
        the least recently used sessions while over a bound. A state larger than max_bytes
        alone is not kept."""
        self._drop(session)
        self.expire()
        if state.nbytes > self.max_bytes:
            self._counts["evictions"] += 1
            return
        state.used_at = self.clock()
        self._states[session] = state
        self._bytes += state.nbytes
        while len(self._states) > self.max_users or self._bytes > self.max_bytes:
            oldest = next(iter(self._states))
            self._drop(oldest)
            self._counts["evictions"] += 1

    def forget(self, session: str) -> bool:
        """Drop the session's state; whether there was one."""
        return self._drop(session)

    def clear(self) -> None:
        """Drop every state (a stage version changed: none of them can be advanced)."""
        self._counts["stale"] += len(self._states)
        self._states.clear()
        self._bytes = 0

    def stats(self) -> StoreStats:
        return StoreStats(users=len(self._states), bytes=self._bytes, **self._counts)

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, session: str) -> bool:
        return session in self._states

    def _drop(self, session: str) -> bool:
        state = self._states.pop(session, None)
        if state is None:
            return False
        self._bytes -= state.nbytes
        return True

    def expire(self) -> None:
        """Drop every state unused for ttl_s (`get` and `put` do it first)."""
        deadline = self.clock() - self.ttl_s
        while self._states:
            oldest_id, oldest = next(iter(self._states.items()))
            if oldest.used_at > deadline:
                return
            self._drop(oldest_id)
            self._counts["expirations"] += 1
