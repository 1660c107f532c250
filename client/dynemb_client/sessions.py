"""Sessions on the client: the requests of the `session` model and the history the client
keeps per session, so that a server that lost a session's state (evicted, expired,
restarted, swapped a stage, or another replica) gets it back without the caller noticing.
Pure (no I/O): shared by the sync and the asyncio client."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, NoReturn

import numpy as np
from tritonclient.grpc import InferRequestedOutput

from dynemb_client.contract import (
    ITEM_IDS,
    ITEM_SCORES,
    ITEM_TITLES,
    MAX_SESSION_ID_BYTES,
    MAX_SESSION_ROWS,
    MAX_TOP_K,
    OP_FORGET,
    OP_START,
    OP_UPDATE,
    SESSION_EVENTS,
    SESSION_ID,
    SESSION_OP,
    SESSION_READ,
    SESSION_STATUS,
    STATUS_OK,
    STATUS_UNKNOWN,
    TOP_K,
    USER_EMBEDDING,
)
from dynemb_client.errors import (
    ClientInputError,
    PartialUpdateError,
    ServerError,
    ServerInputError,
    ServerUnavailable,
    SessionLostError,
    SessionUpdateError,
    is_transient,
)
from dynemb_client.events import Event, TimeLike, to_unix_seconds
from dynemb_client.requests import (
    InferCall,
    ModelShape,
    _check_top_k,
    _to_infer_inputs,
    build_inputs,
    check_event,
    exclusion_sets,
)
from dynemb_client.results import _output

__all__ = [
    "SessionAnswer",
    "SessionHistories",
    "interrupted",
    "parse_sessions",
    "refused_read_count",
    "session_call",
    "update_many_steps",
    "update_steps",
    "without_read_count",
]


@dataclass(frozen=True)
class SessionAnswer:
    embedding: np.ndarray  # float32 (D,); zeros unless status is STATUS_OK
    status: int
    events_held: int
    read: int | None = None  # events read since the session started (None: not answered)


class SessionHistories:
    """The events of each session's window on the server (the newest `events_held` events
    of its last answer: E_t is the embedding of exactly those), least recently used first,
    at most `max_sessions` sessions: what it re-sends when the server lost a state, so the
    rebuilt state answers as the lost one would have."""

    def __init__(self, max_sessions: int = 100_000) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self.max_sessions = max_sessions
        self._events: OrderedDict[str, list[Event]] = OrderedDict()
        self._servers: dict[str, str] = {}  # the endpoint that holds each session's state
        # Sessions whose window on the server holds more events than are kept here (started
        # by another client or process, or kept here only since): their window's length.
        self._partial: dict[str, int] = {}
        # Sessions a call that changes their window was sent for, and whose answer was not
        # settled here (the call failed, timed out, was interrupted or cancelled): whether
        # the server applied it is unknown, so their next update starts them again from
        # the kept window instead of adding events to a window that may already hold them.
        # Oldest first, bounded. (A session's updates are sent one after another: a second
        # update while one is in flight would start the session again too.)
        self._unsettled: dict[str, None] = {}
        # Events each session had read at its last answer (SESSION_READ), where answered.
        self._read: dict[str, int] = {}

    def get(self, session: str) -> list[Event]:
        return list(self._events.get(session, ()))

    def keep(
        self, session: str, events: Sequence[Event], held: int, read: int | None = None
    ) -> None:
        """The session's window is now the newest `held` of `events` (oldest first); with
        fewer than `held` events here, it is partial (`missing`). `read`: the events the
        session has read since it started, if the server said."""
        self._events.pop(session, None)
        self._events[session] = list(events[max(0, len(events) - held) :]) if held else []
        self._unsettled.pop(session, None)
        if read is None:
            self._read.pop(session, None)
        else:
            self._read[session] = read
        if held > len(events):
            self._partial[session] = held
        else:
            self._partial.pop(session, None)
        while len(self._events) > self.max_sessions:
            evicted, _ = self._events.popitem(last=False)
            self._servers.pop(evicted, None)
            self._partial.pop(evicted, None)
            self._read.pop(evicted, None)

    def sending(self, sessions: Iterable[str], start: bool = False) -> None:
        """A call that changes the window of `sessions` is about to be sent: until its
        answer is settled here (`keep`), the server's window is not known to be the kept
        one's. An update of a session whose window this client has never kept is not
        marked: its next update goes as an update, as before (starting it from nothing
        would drop a window another process started); a `start` always is."""
        for session in sessions:
            if not (start or session in self._events):
                continue
            self._unsettled.pop(session, None)
            self._unsettled[session] = None
        while len(self._unsettled) > self.max_sessions:
            del self._unsettled[next(iter(self._unsettled))]

    def not_applied(self, sessions: Iterable[str]) -> None:
        """The server answered the update of `sessions` without applying it (it refused it
        as bad input, or holds no state for them)."""
        for session in sessions:
            self._unsettled.pop(session, None)

    def unsettled(self, session: str) -> bool:
        """Whether an update of the session was sent and not settled (see `sending`)."""
        return session in self._unsettled

    def missing(self, session: str) -> int:
        """How many of the events of the session's window on the server are not kept here
        (0: the kept window is whole, or nothing is known of the session)."""
        held = self._partial.get(session)
        return 0 if held is None else held - len(self._events.get(session, ()))

    def read(self, session: str) -> int | None:
        """The events the session had read at its last answer here (None: not known)."""
        return self._read.get(session)

    def served_by(self, session: str, url: str) -> None:
        """`url` now holds the session's state (the newest call went there)."""
        if session in self._events:
            self._servers[session] = url

    def moved(self, session: str, url: str) -> bool:
        """Whether the session's calls now go to another endpoint than the one that holds
        its state: that one may come back later with a state that missed updates, so the
        new one is started from the kept history instead of updated."""
        held = self._servers.get(session)
        return held is not None and held != url

    def forget(self, session: str) -> None:
        self._events.pop(session, None)
        self._servers.pop(session, None)
        self._partial.pop(session, None)
        self._unsettled.pop(session, None)
        self._read.pop(session, None)

    def __contains__(self, session: str) -> bool:
        return session in self._events

    def __len__(self) -> int:
        return len(self._events)


def check_session_id(session: object) -> str:
    if not isinstance(session, str):
        raise ClientInputError(
            f"a session id is a str, not {type(session).__name__}", field=SESSION_ID
        )
    try:
        size = len(session.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ClientInputError(
            f"a session id must be UTF-8 encodable ({exc.reason} at {exc.start})",
            field=SESSION_ID,
        ) from None
    if not 0 < size <= MAX_SESSION_ID_BYTES:
        raise ClientInputError(
            f"a session id has 1-{MAX_SESSION_ID_BYTES} bytes, got {size}", field=SESSION_ID
        )
    return session


def sorted_events(events: Sequence[Event]) -> list[Event]:
    """The events oldest first (stable), each time checked."""
    if isinstance(events, Event):
        events = [events]
    keyed = [
        (to_unix_seconds(e.time, field="EVENT_TIME", index=i), e) for i, e in enumerate(events)
    ]
    return [e for _, e in sorted(keyed, key=lambda pair: pair[0])]


def query_time(at: TimeLike | None, events: Sequence[Event], kept: Sequence[Event]) -> float:
    """The query time: `at`, else the newest event's (new or kept), else now."""
    if at is not None:
        return to_unix_seconds(at, field="QUERY_TIME")
    for source in (events, kept):
        if source:
            return to_unix_seconds(source[-1].time, field="EVENT_TIME")
    return time.time()


def session_call(
    model: str, session: str, op: int, events: Sequence[Event], at: float, shape: ModelShape
) -> InferCall:
    """One `session` request for one session: the operation, its (new) events and t. An
    update must not be retried (InferCall.retry_safe); a start or a forget can be."""
    return rows_call(model, [(session, op, events, at)], shape)


def rows_call(
    model: str, rows: Sequence[tuple[str, int, Sequence[Event], float]], shape: ModelShape
) -> InferCall:
    """One `session` request of several sessions' rows (session, op, events, t), all of
    whose states live on one endpoint (it is routed by the first)."""
    if not 0 < len(rows) <= MAX_SESSION_ROWS:
        raise ValueError(f"a session request holds 1-{MAX_SESSION_ROWS} rows, got {len(rows)}")
    sessions = [session for session, *_ in rows]
    # Only the events sent travel (the session model's events axis is variable, up to L).
    width = min(shape.max_events, max(1, *(len(events) for _, _, events, _ in rows)))
    arrays = build_inputs(
        [events for _, _, events, _ in rows], [t for *_, t in rows], width, shape.max_labels
    )
    arrays[SESSION_ID] = np.array([[s.encode("utf-8")] for s in sessions], dtype=object)
    arrays[SESSION_OP] = np.array([[op] for _, op, _, _ in rows], dtype=np.int32)
    return InferCall(
        model=model,
        inputs=_to_infer_inputs(arrays),
        outputs=[
            InferRequestedOutput(name)
            for name in (USER_EMBEDDING, SESSION_STATUS, SESSION_EVENTS, SESSION_READ)
            if name != SESSION_READ or shape.session_read  # Triton refuses one it lacks
        ],
        batch=len(rows),
        retry_safe=all(op != OP_UPDATE for _, op, _, _ in rows),
        route=sessions[0],  # one session, one replica: its state lives there
        sessions=tuple(sessions),
    )


def retrieve_call(
    model: str, embedding: np.ndarray, k: int, exclude: Iterable[str] | None = ()
) -> InferCall:
    """A `retrieve` request for one E_t: up to k items, leaving out `exclude`."""
    _check_top_k(k)
    [excluded] = exclusion_sets([exclude], 1)
    asked = min(MAX_TOP_K, k + len(excluded))
    arrays = {
        USER_EMBEDDING: np.asarray(embedding, dtype=np.float32).reshape(1, -1),
        TOP_K: np.array([[asked]], dtype=np.int32),
    }
    return InferCall(
        model=model,
        inputs=_to_infer_inputs(arrays),
        outputs=[InferRequestedOutput(n) for n in (ITEM_IDS, ITEM_SCORES, ITEM_TITLES)],
        batch=1,
        exclude=(excluded,),
    )


def parse_sessions(result, model: str, batch: int) -> list[SessionAnswer]:
    """Each row's answer, in the request's order."""
    embeddings = _output(result, USER_EMBEDDING, model, batch)
    status = _output(result, SESSION_STATUS, model, batch).reshape(batch)
    held = _output(result, SESSION_EVENTS, model, batch).reshape(batch)
    read = result.as_numpy(SESSION_READ)  # None unless asked (ModelShape.session_read)
    read = [None] * batch if read is None else [int(r) for r in read.reshape(batch)]
    embeddings = np.asarray(embeddings, dtype=np.float32).reshape(batch, -1)
    return [
        SessionAnswer(embeddings[i], int(status[i]), int(held[i]), read[i]) for i in range(batch)
    ]


MAX_RESTARTS = 3  # starts again after an update that failed in transit, then gives up


def update_steps(
    histories: SessionHistories,
    model: str,
    session: str,
    events: Sequence[Event],
    at: TimeLike | None,
    shape: ModelShape,
    history: Sequence[Event] | None = None,
    moved: bool = False,
) -> Generator[InferCall, list[SessionAnswer], SessionAnswer]:
    """The calls of one update, sans I/O: the client sends each yielded call and sends
    back its answer. First the new events alone; if the server holds no state for the
    session, the window kept here (or the newest L of the caller's `history`) is started
    again and then updated by the new events, which is the answer the lost state would
    have given (one start with both when they fit one window, since the window's length
    depends only on how many events it has read: dynemb.sessions.state.window_after).
    More than L new events go as successive updates of at most L (the wire carries L).
    `moved` (the session's endpoint changed, SessionHistories.moved), or an earlier update
    that was never settled (SessionHistories.unsettled): from scratch at once."""
    update = _prepared(session, events, at, shape, histories, history)
    moved = moved or histories.unsettled(update.session)
    before = (update.kept, len(update.kept) + update.missing, update.read)  # what it extends
    answer = None
    for i, chunk in enumerate(_chunks(update.events, shape.max_events)):
        if i:  # the window is now the one the previous chunk's answer reported
            session = update.session
            update = update._replace(
                kept=histories.get(session),
                missing=histories.missing(session),
                read=histories.read(session),
            )
        try:
            sent = (
                None
                if moved and not i
                else (yield from _update(histories, model, update.session, chunk, update.t, shape))
            )
            answer = yield from _settled(histories, model, update, chunk, shape, sent)
        except BaseException:
            if i:  # earlier runs were applied: as a whole, the update failed and is unsettled
                histories.keep(update.session, *before)
                histories.sending([update.session], start=True)
            raise
    return answer


def update_many_steps(
    histories: SessionHistories,
    model: str,
    updates: Mapping[str, Sequence[Event]],
    at: TimeLike | None,
    shape: ModelShape,
    route: Callable[[str], str],
) -> Generator[InferCall, list[SessionAnswer], dict[str, SessionAnswer]]:
    """Several sessions' updates, sans I/O: one `session` request of up to
    MAX_SESSION_ROWS rows per endpoint holding their states (`route`), then, for each
    session the server holds no state for (or whose request was lost in transit), the
    single-session fallback of `update_steps`. A request refused as bad input applied
    none of its rows: its sessions are sent again one by one, so that only the culprits
    fail, and a SessionUpdateError names them after every other session is updated (as
    it names a session whose update is refused here, before sending, as the server would
    refuse it). A session with more than L new events goes alone, as `update_steps`
    sends it. Sessions whose request failed otherwise (a server error, a timeout) may
    have been updated or not: they stay unsettled (SessionHistories.sending), and a
    PartialUpdateError names them with the others' E_t; with no server answering, the
    sessions not yet tried are not, and fail with it too."""
    prepared = {}
    failed: dict[str, Exception] = {}
    for session, events in updates.items():
        try:
            update = _prepared(session, events, at, shape, histories)
        except ClientInputError as exc:  # refused here as the server would: it fails alone
            failed[session] = exc
            continue
        prepared[update.session] = update
    answers: dict[str, SessionAnswer | None] = dict.fromkeys(prepared)
    alone: set[str] = set()  # in a refused request: each is sent again by itself
    by_endpoint: dict[str, list[str]] = {}
    for session, update in prepared.items():
        url = route(session)
        if len(update.events) > shape.max_events:
            alone.add(session)
        elif not histories.moved(session, url) and not histories.unsettled(session):
            by_endpoint.setdefault(url, []).append(session)
    for sessions in by_endpoint.values():
        for start in range(0, len(sessions), MAX_SESSION_ROWS):
            chunk = sessions[start : start + MAX_SESSION_ROWS]
            rows = [(s, OP_UPDATE, prepared[s].events, prepared[s].t) for s in chunk]
            try:
                call = rows_call(model, rows, shape)
            except ClientInputError:  # an image file found bad as it is read: each alone
                alone.update(chunk)
                continue
            histories.sending(chunk)
            try:
                got = yield from _sent(call)
            except ServerInputError:
                histories.not_applied(chunk)
                alone.update(chunk)
                continue
            except ServerError as exc:  # applied or not, unknown: they fail, unsettled
                for session in chunk:
                    failed[session] = exc
                    del answers[session]
                continue
            if got is not None:  # else whether it was applied is unknown: each starts again
                answers.update(zip(chunk, got, strict=True))
                histories.not_applied(s for s in chunk if answers[s].status != STATUS_OK)
    done: dict[str, SessionAnswer] = {}
    down: ServerUnavailable | None = None
    for session, answer in answers.items():
        update = prepared[session]
        if down is not None and (session in alone or answer is None or answer.status != STATUS_OK):
            failed[session] = down  # each would wait out the deadline: not tried
            continue
        try:
            if session in alone:
                moved = histories.moved(session, route(session))
                done[session] = yield from update_steps(
                    histories, model, session, update.events, update.t, shape, moved=moved
                )
            else:
                done[session] = yield from _settled(
                    histories, model, update, update.events, shape, answer
                )
        except ServerUnavailable as exc:
            down = failed[session] = exc
        except (ServerError, ClientInputError) as exc:
            failed[session] = exc
    if failed:
        applied = {s: a.embedding for s, a in done.items()}
        refusals = (ClientInputError, ServerInputError, SessionLostError)
        if all(isinstance(exc, refusals) for exc in failed.values()):
            raise SessionUpdateError(applied, failed)
        raise PartialUpdateError(applied, failed)
    return done


class _Update(NamedTuple):
    """One session's update, checked (see `_prepared`)."""

    session: str
    events: list[Event]  # the new events, oldest first
    kept: list[Event]  # the window it restarts from, if the server lost the state
    t: float
    missing: int  # events of the server's window that `kept` lacks (0: it is whole)
    # Events the session had read as far as this client knows (SessionHistories.read;
    # None: not known, or the caller's history= stands for the session's events).
    read: int | None


def _prepared(
    session: str,
    events: Sequence[Event],
    at: TimeLike | None,
    shape: ModelShape,
    histories: SessionHistories,
    history: Sequence[Event] | None = None,
) -> _Update:
    """One session's update, checked: its id, its new events oldest first, the window it
    restarts from if need be (the caller's `history`, else the one kept here) and t.
    Refused here as the server would refuse them: new events before the window's newest
    or after t, and t before the window's newest. (A restart would not refuse them: it
    sends a whole history, which is sorted and cut at t.)"""
    session = check_session_id(session)
    if isinstance(events, Event):
        events = [events]
    if isinstance(events, (str, bytes)) or not isinstance(events, Iterable):
        raise TypeError(f"a session's new events are a sequence of Event, not {events!r}"[:200])
    events = list(events)
    for index, event in enumerate(events):  # a bad one fails this session alone
        check_event(event, index, shape.max_labels)
    events = sorted_events(events)
    kept = sorted_events(history) if history is not None else histories.get(session)
    missing = 0 if history is not None else histories.missing(session)
    # The caller's history= is taken as the session's events (its count is not the
    # server's: a start reads the newest L of it, and the server counts from its last
    # start); the count the answer gives is the one later updates are checked against.
    read = None if history is not None else histories.read(session)
    t = query_time(at, events, kept)
    if events and to_unix_seconds(events[-1].time, field="EVENT_TIME") > t:
        raise ClientInputError(
            f"{t} precedes the newest new event: a session's events cannot be in t's future",
            field="QUERY_TIME",
        )
    if kept:
        newest = to_unix_seconds(kept[-1].time, field="EVENT_TIME")
        if events and to_unix_seconds(events[0].time, field="EVENT_TIME") < newest:
            raise ClientInputError(
                f"{events[0].time} precedes the session's newest event {newest}: a session "
                "cannot take back what E_t has read",
                field="EVENT_TIME",
                index=0,
            )
        if t < newest:
            raise ClientInputError(
                f"{t} precedes the session's newest event {newest}: its events cannot be in "
                "t's future",
                field="QUERY_TIME",
            )
    return _Update(session, events, kept[-shape.max_events :], t, missing, read)


def _chunks(events: list[Event], size: int) -> list[list[Event]]:
    """`events` in runs of at most `size`, oldest first (one empty run for none)."""
    return [events[i : i + size] for i in range(0, len(events), size)] or [[]]


def _settled(
    histories: SessionHistories,
    model: str,
    update: _Update,
    events: list[Event],
    shape: ModelShape,
    answer: SessionAnswer | None,
) -> Generator[InferCall, list[SessionAnswer], SessionAnswer]:
    """The update's answer once the server holds the session: as `answer` was, or, with
    no state there (or `answer` None: whether the update was applied is unknown), after
    starting again from the kept window; then the kept window follows the server's. A
    kept window that lacks some of the server's events is not restarted from: the answer
    would be another window's (SessionLostError)."""
    session, kept, t = update.session, update.kept, update.t
    restarted = answer is None or answer.status == STATUS_UNKNOWN
    if restarted:
        if update.missing:
            raise SessionLostError(
                f"session {session!r}: the server no longer holds its state (or an earlier "
                "update's outcome is unknown), and this client "
                f"keeps {len(kept)} of the {len(kept) + update.missing} events of its window "
                "(it was started by another client or process, or its history was dropped "
                "here): send the session's events with history= to start it again",
                model=model,
            )
        for _ in range(MAX_RESTARTS):
            answer = yield from _restart(histories, model, session, kept, events, t, shape)
            if answer is not None:
                break
    if answer is None or answer.status != STATUS_OK:
        status = "unreachable" if answer is None else f"status {answer.status}"
        raise ServerError(f"session {session!r}: {status}", model=model)
    known = not restarted and None not in (answer.read, update.read)
    # Another writer (a client or process) added events this one does not keep when the
    # count read is not this one's: of the window, only the events just sent are known.
    foreign = known and answer.read != update.read + len(events)
    window = events if foreign else [*kept, *events]
    histories.keep(session, window, answer.events_held, answer.read)
    return answer


def _update(
    histories: SessionHistories,
    model: str,
    session: str,
    events: Sequence[Event],
    t: float,
    shape: ModelShape,
) -> Generator[InferCall, list[SessionAnswer], SessionAnswer | None]:
    """An update (never re-sent: had a lost answer been applied, its events would count
    twice); None when it failed in transit. Marked unsettled while in flight (see
    SessionHistories.sending): if it raises, the session's next update starts it again."""
    call = session_call(model, session, OP_UPDATE, events, t, shape)
    histories.sending([session])
    try:
        answers = yield from _sent(call)
    except ServerInputError:
        histories.not_applied([session])
        raise
    if answers is None:
        return None
    if answers[0].status != STATUS_OK:
        histories.not_applied([session])
    return answers[0]


def refused_read_count(exc: BaseException, call: InferCall) -> bool:
    """Whether a server refused `call` for asking SESSION_READ, which its session model
    (built before it) lacks: during a rolling upgrade an endpoint may serve an older
    repository than the one whose metadata the client read. Refused as INVALID_ARG, the
    call was not applied, so it can be sent again without the output."""
    asked = any(output.name() == SESSION_READ for output in call.outputs)
    return (
        asked
        and isinstance(exc, ServerInputError)
        and f"unexpected inference output '{SESSION_READ}'" in str(exc)
    )


def without_read_count(call: InferCall) -> InferCall:
    return replace(call, outputs=[o for o in call.outputs if o.name() != SESSION_READ])


def interrupted(steps: Generator, exc: BaseException) -> NoReturn:
    """`exc` (Ctrl-C, a cancelled task) interrupted a call of `steps`: the steps settle
    their sessions as for any failed call (the session stays unsettled; an update of
    more than L events puts back the window before it, since earlier runs were applied),
    then it goes on up. Without this the steps were left suspended, and an update cut
    in its second run kept its first run's window."""
    with contextlib.suppress(StopIteration):
        steps.throw(exc)
    steps.close()  # steps that went on after an interruption send nothing more
    raise exc


def _sent(call: InferCall) -> Generator[InferCall, list[SessionAnswer], list[SessionAnswer] | None]:
    """The answers to `call`, or None when it failed in transit (whether the server
    applied it is then unknown); anything else it raises is the caller's to handle."""
    try:
        return (yield call)
    except Exception as exc:
        if not is_transient(exc):
            raise
        return None


def _restart(
    histories: SessionHistories,
    model: str,
    session: str,
    kept: Sequence[Event],
    events: Sequence[Event],
    t: float,
    shape: ModelShape,
) -> Generator[InferCall, list[SessionAnswer], SessionAnswer | None]:
    """The session started from `kept` (its window), then updated by `events`: one start
    when both fit the wire's L events (the same window: its length depends only on how
    many events it read), else a start and an update. A start other than OK is an
    answer (an error for the caller); None when the update failed in transit. Unsettled
    from the start's sending on: a start that raises may have replaced the window."""
    if len(kept) + len(events) <= shape.max_events or not kept or not events:
        call = session_call(model, session, OP_START, [*kept, *events], t, shape)
        histories.sending([session], start=True)
        [answer] = yield call
        return answer
    call = session_call(model, session, OP_START, kept, t, shape)
    histories.sending([session], start=True)
    [started] = yield call
    if started.status != STATUS_OK:
        return started
    return (yield from _update(histories, model, session, events, t, shape))


def forget_steps(
    histories: SessionHistories, model: str, session: str, shape: ModelShape
) -> Generator[InferCall, list[SessionAnswer], SessionAnswer]:
    session = check_session_id(session)
    histories.forget(session)
    [answer] = yield session_call(model, session, OP_FORGET, [], time.time(), shape)
    return answer
