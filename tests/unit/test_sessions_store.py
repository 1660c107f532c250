"""The session store's bounds and version tags, and the client's session steps (sans I/O:
answers fed in by hand, so the fallback paths are exercised without a server)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from dynemb.sessions.state import SessionState, StateStore, appended, window_after
from dynemb_client import Event, ModelShape, ServerError, ServerInputError, SessionUpdateError
from dynemb_client import contract as wire
from dynemb_client.sessions import (
    MAX_RESTARTS,
    SessionAnswer,
    SessionHistories,
    session_call,
    update_many_steps,
    update_steps,
)

V1 = (("text_rnn", "1"),)
V2 = (("text_rnn", "2"),)


def state(n: int = 3, versions=V1) -> SessionState:
    return SessionState(
        versions=versions,
        times=np.arange(n, dtype=np.float64),
        labels=[[]] * n,
        ratings=np.full(n, np.nan),
        events=np.zeros((n, 4), np.float32),
        lstm_h=np.zeros(2, np.float32),
        lstm_c=np.zeros(2, np.float32),
        keys=np.zeros((1, 1, n + 1, 8), np.float32),
        values=np.zeros((1, 1, n + 1, 8), np.float32),
        newest=np.zeros(4, np.float32),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hit_miss_and_stale_versions():
    store = StateStore()
    assert store.get("a", V1) is None
    store.put("a", state())
    assert store.get("a", V1) is not None
    # Computed by other versions: dropped, never handed out.
    assert store.get("a", V2) is None and "a" not in store
    s = store.stats()
    assert (s.hits, s.misses, s.stale, s.users) == (1, 1, 1, 0)


def test_least_recently_used_goes_first_when_over_users():
    store = StateStore(max_users=2)
    store.put("a", state())
    store.put("b", state())
    store.get("a", V1)  # a is now the most recent
    store.put("c", state())
    assert "a" in store and "c" in store and "b" not in store
    assert store.stats().evictions == 1


def test_the_byte_bound_holds():
    one = state(10).nbytes
    store = StateStore(max_bytes=int(2.5 * one))
    for i in range(10):
        store.put(str(i), state(10))
        assert store.stats().bytes <= 2.5 * one
    assert len(store) == 2 and store.stats().evictions == 8
    # One state larger than the bound is not kept (nor does it empty the store).
    store.put("huge", state(100))
    assert "huge" not in store and len(store) == 2


def test_replacing_a_state_keeps_the_byte_count():
    store = StateStore()
    store.put("a", state(3))
    store.put("a", state(5))
    assert store.stats().bytes == state(5).nbytes and len(store) == 1


def test_unused_states_expire():
    clock = Clock()
    store = StateStore(ttl_s=10, clock=clock)
    store.put("a", state())
    clock.now = 5
    store.put("b", state())
    clock.now = 12
    assert store.get("b", V1) is not None  # 7 s unused
    assert "a" not in store and store.stats().expirations == 1


def test_states_expire_on_put_too():
    """A store that only ever starts sessions still drops the ones unused for ttl_s."""
    clock = Clock()
    store = StateStore(ttl_s=10, clock=clock)
    for i in range(5):
        clock.now = 100.0 * i
        store.put(str(i), state())
    assert list(store._states) == ["4"] and store.stats().expirations == 4


def tokens(first: int, count: int) -> np.ndarray:
    """Keys of `count` tokens whose values name their position: (1, 2, count, 3)."""
    return np.broadcast_to(
        np.arange(first, first + count, dtype=np.float32)[None, None, :, None], (1, 2, count, 3)
    ).copy()


def grown(base: SessionState | None, first: int, count: int, limit: int = 51) -> SessionState:
    kv = appended(base, tokens(first, count), -tokens(first, count), limit)
    n = kv[0].shape[2] - 1
    return SessionState(
        V1, np.arange(n, dtype=np.float64), [[]] * n, np.full(n, np.nan),
        np.zeros((n, 4), np.float32), np.zeros(2, np.float32), np.zeros(2, np.float32),
        kv[0], kv[1], np.zeros(4, np.float32), room=kv[2],
    )  # fmt: skip


def test_keys_and_values_grow_in_place_and_a_kept_state_never_changes():
    first = grown(None, 0, 5)  # a start token and 4 events
    room = first.room
    second = grown(first, 5, 1)
    assert second.room is room  # the newest state's append writes in place
    assert np.shares_memory(second.keys, first.keys)
    # A state that is not its room's newest (the session was advanced from it before)
    # copies: the first branch keeps what it read.
    branch = grown(first, 50, 2)
    assert branch.room is not room
    expected = ((first, range(5)), (second, range(6)), (branch, [*range(5), 50, 51]))
    for s, positions in expected:
        assert s.keys.shape == (1, 2, len(positions), 3)
        np.testing.assert_array_equal(s.keys[0, 0, :, 0], positions)
        np.testing.assert_array_equal(s.values, -s.keys)


def test_a_room_doubles_up_to_the_window_and_the_store_counts_all_of_it():
    state, capacities = None, []
    for first in range(51):
        state = grown(state, first, 1)
        capacities.append(state.room.keys.shape[2])
    assert capacities[:17] == [16] * 16 + [34]  # doubles when full
    assert max(capacities) == 51  # never more than L + 1 tokens
    assert state.keys.shape[2] == 51
    np.testing.assert_array_equal(state.keys[0, 1, :, 2], np.arange(51))
    # The bytes a store counts are the room's, not the views'.
    assert state.nbytes >= state.room.keys.nbytes + state.room.values.nbytes
    assert grown(None, 0, 60).keys.shape[2] == 60  # more than the limit: exactly as asked


def test_forget_and_clear():
    store = StateStore()
    store.put("a", state())
    store.put("b", state())
    assert store.forget("a") and not store.forget("a")
    store.clear()
    assert len(store) == 0 and store.stats().bytes == 0


SHAPE = ModelShape(max_events=4, max_labels=2)
UNKNOWN = SessionAnswer(np.zeros(3, np.float32), wire.STATUS_UNKNOWN, 0)


def ok(held: int, read: int | None = None) -> SessionAnswer:
    """An answer whose window holds `held` events (of `read` since the session started)."""
    return SessionAnswer(np.ones(3, np.float32), wire.STATUS_OK, held, read)


def events(*times: float) -> list[Event]:
    return [Event(t, f"e{t}") for t in times]


def sent_events(call) -> int:
    count = next(i for i in call.inputs if i.name() == wire.EVENT_COUNT)
    return count._raw_content and int(np.frombuffer(count._raw_content, np.int32)[0])


def sent_times(call) -> list[float]:
    found = next(i for i in call.inputs if i.name() == wire.EVENT_TIME)
    return list(np.frombuffer(found._raw_content, np.float64)[: sent_events(call)])


def op(call) -> int:
    found = next(i for i in call.inputs if i.name() == wire.SESSION_OP)
    return int(np.frombuffer(found._raw_content, np.int32)[0])


def drive(steps, answers):
    """Feed answers (a SessionAnswer for a one-row call, a list for several, or an
    exception) to the steps; the calls they made."""
    calls = [next(steps)]
    try:
        for answer in answers:
            if isinstance(answer, Exception):
                calls.append(steps.throw(answer))
            else:
                calls.append(steps.send(answer if isinstance(answer, list) else [answer]))
    except StopIteration as done:
        return calls, done.value
    raise AssertionError("the steps wanted more answers")


def kept_times(histories: SessionHistories, session: str = "u") -> list[float]:
    return [e.time for e in histories.get(session)]


LOST = InferenceServerException("connection reset", status="StatusCode.UNAVAILABLE")


def test_an_update_sends_only_the_new_events():
    histories = SessionHistories()
    histories.keep("u", events(1, 2, 3), 3)
    steps = update_steps(histories, "session", "u", events(4), None, SHAPE)
    calls, answer = drive(steps, [ok(4)])
    assert len(calls) == 1 and op(calls[0]) == wire.OP_UPDATE and sent_events(calls[0]) == 1
    assert not calls[0].retry_safe
    assert answer.events_held == 4 and kept_times(histories) == [1, 2, 3, 4]


def test_the_client_keeps_exactly_the_window_the_server_reports():
    histories = SessionHistories()
    histories.keep("u", events(1, 2, 3, 4), 4)
    drive(update_steps(histories, "session", "u", events(5), None, SHAPE), [ok(2)])
    assert kept_times(histories) == [4, 5]  # re-windowed to its newest 2 events


def test_an_unknown_session_is_started_from_the_kept_window_with_the_new_events():
    histories = SessionHistories()
    histories.keep("u", events(1, 2), 2)
    steps = update_steps(histories, "session", "u", events(3, 4), None, SHAPE)
    calls, _ = drive(steps, [UNKNOWN, ok(4)])
    assert op(calls[1]) == wire.OP_START and sent_times(calls[1]) == [1, 2, 3, 4]
    assert calls[1].retry_safe
    assert kept_times(histories) == [1, 2, 3, 4]


def test_a_window_and_new_events_beyond_l_are_a_start_then_an_update():
    """Sent together the server would hold the newest L; the lost state had re-windowed."""
    histories = SessionHistories()
    histories.keep("u", events(1, 2, 3), 3)
    steps = update_steps(histories, "session", "u", events(4, 5), None, SHAPE)
    calls, answer = drive(steps, [UNKNOWN, ok(3), ok(2)])
    assert [op(c) for c in calls] == [wire.OP_UPDATE, wire.OP_START, wire.OP_UPDATE]
    assert sent_times(calls[1]) == [1, 2, 3] and sent_times(calls[2]) == [4, 5]
    assert answer.events_held == 2 and kept_times(histories) == [4, 5]


def test_a_transient_failure_of_an_update_starts_over_instead_of_resending_it():
    histories = SessionHistories()
    histories.keep("u", events(1), 1)
    calls, _ = drive(update_steps(histories, "session", "u", events(2), None, SHAPE), [LOST, ok(2)])
    assert [op(c) for c in calls] == [wire.OP_UPDATE, wire.OP_START]
    assert sent_events(calls[1]) == 2


def test_a_lost_update_after_a_restart_starts_again_a_bounded_number_of_times():
    histories = SessionHistories()
    histories.keep("u", events(1, 2, 3), 3)
    steps = update_steps(histories, "session", "u", events(4, 5), None, SHAPE)
    calls, answer = drive(steps, [LOST, ok(3), LOST, ok(3), ok(2)])
    ops = [op(c) for c in calls]
    assert ops == [wire.OP_UPDATE, wire.OP_START, wire.OP_UPDATE, wire.OP_START, wire.OP_UPDATE]
    assert answer.events_held == 2
    steps = update_steps(histories, "session", "u", events(6, 7, 8), None, SHAPE)
    with pytest.raises(ServerError, match="unreachable"):
        drive(steps, [LOST] + [ok(2), LOST] * MAX_RESTARTS)


def test_a_bad_input_error_is_not_papered_over():
    bad = InferenceServerException("bad input", status="StatusCode.INVALID_ARGUMENT")
    steps = update_steps(SessionHistories(), "session", "u", events(2), None, SHAPE)
    next(steps)
    with pytest.raises(InferenceServerException):
        steps.throw(bad)


def test_a_start_that_is_still_unknown_is_an_error():
    steps = update_steps(SessionHistories(), "session", "u", events(2), None, SHAPE)
    with pytest.raises(ServerError, match="status 1"):
        drive(steps, [UNKNOWN, UNKNOWN])


def test_the_caller_history_wins_over_the_kept_one():
    histories = SessionHistories()
    histories.keep("u", events(1), 1)
    steps = update_steps(histories, "session", "u", events(9), None, SHAPE, history=events(5, 6))
    calls, _ = drive(steps, [UNKNOWN, ok(3)])
    assert sent_times(calls[1]) == [5, 6, 9]
    assert kept_times(histories) == [5, 6, 9]


def test_histories_are_bounded_least_recent_first():
    histories = SessionHistories(max_sessions=2)
    for user in "abc":
        histories.keep(user, events(1), 1)
    assert "a" not in histories and len(histories) == 2


def session_ids(call) -> list[str]:
    return list(call.sessions)


def test_update_many_sends_one_request_per_endpoint_and_keeps_each_window():
    histories = SessionHistories()
    for user in ("a", "b", "c"):
        histories.keep(user, events(1, 2), 2)
    route = {"a": "x:1", "b": "y:1", "c": "x:1"}.get
    updates = {"a": events(3), "b": events(4, 5), "c": events(6)}
    steps = update_many_steps(histories, "session", updates, None, SHAPE, route)
    calls, done = drive(steps, [[ok(3), ok(3)], [ok(4)]])
    assert [session_ids(c) for c in calls] == [["a", "c"], ["b"]]
    assert all(op(c) == wire.OP_UPDATE and not c.retry_safe for c in calls)
    assert calls[0].batch == 2 and calls[0].route == "a"
    assert set(done) == {"a", "b", "c"}
    assert kept_times(histories, "b") == [1, 2, 4, 5] and kept_times(histories, "c") == [1, 2, 6]


def test_update_many_fills_requests_up_to_the_row_limit():
    histories = SessionHistories()
    updates = {f"u{i}": events(1) for i in range(wire.MAX_SESSION_ROWS + 3)}
    steps = update_many_steps(histories, "session", updates, None, SHAPE, lambda s: "x:1")
    first = next(steps)
    assert first.batch == wire.MAX_SESSION_ROWS
    second = steps.send([ok(1)] * wire.MAX_SESSION_ROWS)
    assert second.batch == 3


def test_update_many_restarts_the_sessions_the_server_lost():
    histories = SessionHistories()
    histories.keep("a", events(1, 2), 2)
    updates = {"a": events(3), "b": events(4)}
    steps = update_many_steps(histories, "session", updates, None, SHAPE, lambda s: "x:1")
    calls, done = drive(steps, [[UNKNOWN, ok(1)], ok(3)])
    assert op(calls[1]) == wire.OP_START and sent_times(calls[1]) == [1, 2, 3]
    assert session_ids(calls[1]) == ["a"] and calls[1].retry_safe
    assert done["a"].events_held == 3 and kept_times(histories, "a") == [1, 2, 3]


def test_a_lost_many_update_starts_every_session_again():
    histories = SessionHistories()
    histories.keep("a", events(1), 1)
    steps = update_many_steps(
        histories, "session", {"a": events(2), "b": events(3)}, None, SHAPE, lambda s: "x:1"
    )
    calls, done = drive(steps, [LOST, ok(2), ok(1)])
    assert [op(c) for c in calls] == [wire.OP_UPDATE, wire.OP_START, wire.OP_START]
    assert [session_ids(c) for c in calls[1:]] == [["a"], ["b"]]
    assert set(done) == {"a", "b"}


def test_a_refused_many_update_fails_only_its_culprits():
    """The server applied none of the refused request's rows; sent again one by one, the
    good sessions are updated and the bad one is named."""
    histories = SessionHistories()
    for user in ("a", "b"):
        histories.keep(user, events(1), 1)
    bad = ServerInputError(
        "EVENT_TIME[0] precedes the session's newest event",
        model="session",
        status="INVALID_ARGUMENT",
    )
    steps = update_many_steps(
        histories, "session", {"a": events(2), "b": events(3)}, None, SHAPE, lambda s: "x:1"
    )
    with pytest.raises(SessionUpdateError) as raised:
        drive(steps, [bad, ok(2), bad])
    steps = update_many_steps(
        SessionHistories(),
        "session",
        {"a": events(2), "b": events(3)},
        None,
        SHAPE,
        lambda s: "x:1",
    )
    first = next(steps)
    second = steps.throw(bad)
    third = steps.send([ok(1)])
    assert [op(c) for c in (first, second, third)] == [wire.OP_UPDATE] * 3
    assert [session_ids(c) for c in (first, second, third)] == [["a", "b"], ["a"], ["b"]]
    assert list(raised.value.failed) == ["b"] and list(raised.value.applied) == ["a"]
    assert isinstance(raised.value, ServerInputError)
    # the model and status lead the message once (they were repeated before the detail)
    assert str(raised.value) == (
        "session [INVALID_ARGUMENT]: 1 session(s) refused ('b'): "
        "EVENT_TIME[0] precedes the session's newest event"
    )
    assert kept_times(histories, "a") == [1, 2] and kept_times(histories, "b") == [1]


def test_a_moved_session_of_a_many_update_starts_from_its_kept_window():
    histories = SessionHistories()
    histories.keep("a", events(1), 1)
    histories.served_by("a", "old:1")
    steps = update_many_steps(histories, "session", {"a": events(2)}, None, SHAPE, lambda s: "x:1")
    calls, _ = drive(steps, [ok(2)])
    assert [op(c) for c in calls] == [wire.OP_START]


# --- the session model's row logic, over a stand-in engine that counts events ---------


class CountingEngine:
    """Advances a session by appending its new events' count (no networks)."""

    versions = V1

    class dims:  # noqa: N801
        embed_dim = 3

    def __init__(self) -> None:
        self.batches: list[int] = []

    def advance(self, batch):
        from dynemb.errors import InputError
        from dynemb.sessions.engine import Advanced

        self.batches.append(len(batch))
        out = []
        for base, x in batch:
            k = int(x[wire.EVENT_COUNT][0])
            if k < 0:
                out.append(InputError(wire.EVENT_COUNT, "negative"))
                continue
            n = (base.n_events if base else 0) + k
            out.append(Advanced(state(n), np.full(3, n, np.float32)))
        return out


def row(session: str, op: int, k: int = 1, request: int = 0):
    from dynemb.sessions.serving import _Row

    return _Row(request, session, op, {wire.EVENT_COUNT: np.array([k])})


def test_rows_of_one_session_in_one_batch_advance_one_after_the_other():
    from dynemb.sessions.serving import serve_rows

    store, engine = StateStore(), CountingEngine()
    rows = [row("a", wire.OP_START, 2), row("a", wire.OP_UPDATE), row("b", wire.OP_UPDATE)]
    answers = serve_rows(store, engine, rows)
    assert [a[2] for a in answers] == [2, 3, 0]
    assert answers[2][1] == wire.STATUS_UNKNOWN  # b was never started
    assert store.get("a", V1).n_events == 3


def test_bad_rows_fail_alone_and_forget_drops():
    from dynemb.errors import InputError
    from dynemb.sessions.serving import serve_rows

    store, engine = StateStore(), CountingEngine()
    serve_rows(store, engine, [row("a", wire.OP_START, 1), row("b", wire.OP_START, 1)])
    answers = serve_rows(
        store,
        engine,
        [row("a", wire.OP_UPDATE, -1), row("b", wire.OP_UPDATE, 1), row("c", wire.OP_FORGET)],
    )
    assert isinstance(answers[0], InputError)
    assert answers[1][1] == wire.STATUS_OK and answers[1][2] == 2
    assert answers[2][1] == wire.STATUS_FORGOTTEN
    assert store.get("a", V1).n_events == 1  # untouched by its bad update
    serve_rows(store, engine, [row("b", wire.OP_FORGET)])
    assert "b" not in store


# --- the window past L -----------------------------------------------------------------


def one_at_a_time(held: int, new: int, max_events: int, block: int) -> int:
    """The rule as stated: each event joins; a window of L that gets one more keeps its
    newest L - B + 1."""
    for _ in range(new):
        held = held + 1 if held < max_events else max_events - block + 1
    return held


@pytest.mark.parametrize("block", [1, 2, 7, 25, 50])
def test_the_window_is_the_one_event_at_a_time_rule_however_events_are_grouped(block):
    for held in range(51):
        for new in (0, 1, 2, 9, 50):
            got = window_after(held, new, 50, block)
            assert got == one_at_a_time(held, new, 50, block), (held, new)
            assert 50 - block + 1 <= got <= 50 or got == held + new
            # a restart from the window and the new events lands on the same window
            assert window_after(0, held + new, 50, block) == got


def test_block_one_always_keeps_the_newest_l_and_a_bad_block_is_refused():
    assert [window_after(50, k, 50, 1) for k in (1, 2, 30)] == [50, 50, 50]
    assert [window_after(50, k, 50, 25) for k in range(1, 27)] == [*range(26, 51), 26]
    with pytest.raises(ValueError, match="block"):
        window_after(3, 1, 50, 0)
    with pytest.raises(ValueError, match="block"):
        window_after(3, 1, 50, 51)


def test_a_request_with_a_bad_row_applies_none_of_its_rows():
    """Request 0 holds a good and a bad row: a gets its state back, b (never held) none;
    request 1 (another caller) is untouched."""
    from dynemb.sessions.serving import serve_rows

    store, engine = StateStore(), CountingEngine()
    serve_rows(store, engine, [row("a", wire.OP_START, 1), row("c", wire.OP_START, 1)])
    rows = [
        row("a", wire.OP_UPDATE, 1, request=0),
        row("b", wire.OP_START, -1, request=0),
        row("c", wire.OP_UPDATE, 1, request=1),
    ]
    answers = serve_rows(store, engine, rows)
    assert answers[0][2] == 2 and isinstance(answers[1], Exception)
    assert store.get("a", V1).n_events == 1  # as before the refused request
    assert "b" not in store and store.get("c", V1).n_events == 2


def test_a_session_changed_by_a_refused_and_a_good_request_is_dropped():
    from dynemb.sessions.serving import serve_rows

    store, engine = StateStore(), CountingEngine()
    serve_rows(store, engine, [row("a", wire.OP_START, 1)])
    rows = [
        row("a", wire.OP_UPDATE, 1, request=0),
        row("x", wire.OP_START, -1, request=0),
        row("a", wire.OP_UPDATE, 1, request=1),
    ]
    serve_rows(store, engine, rows)
    assert "a" not in store  # its next update is answered STATUS_UNKNOWN


def test_a_session_request_s_event_tensors_share_one_width_up_to_l():
    from dynemb.errors import InputError
    from dynemb.sessions.serving import check_event_width

    def request(width: int, count: int, labels_width: int | None = None) -> dict:
        return {
            wire.EVENT_TEXT: np.full((2, width), b"", dtype=object),
            wire.EVENT_IMAGE: np.full((2, width), b"", dtype=object),
            wire.EVENT_LABELS: np.full((2, labels_width or width, 8), b"", dtype=object),
            wire.EVENT_TIME: np.zeros((2, width)),
            wire.EVENT_COUNT: np.full((2, 1), count, dtype=np.int32),
        }

    check_event_width(request(1, 1), 50)  # one new event each: what an update sends
    check_event_width(request(50, 7), 50)
    with pytest.raises(InputError, match=r"EVENT_LABELS.*equal"):
        check_event_width(request(3, 1, labels_width=2), 50)
    with pytest.raises(InputError, match="at most 50"):
        check_event_width(request(51, 1), 50)
    with pytest.raises(InputError, match="EVENT_COUNT"):
        check_event_width(request(2, 3), 50)


def test_a_refused_request_never_puts_back_an_expired_state():
    """Undoing a refused request restores what a lookup would have found: an expired
    state stays gone (it was not put back with a fresh time of use)."""
    from dynemb.sessions.serving import serve_rows

    clock = Clock()
    store, engine = StateStore(ttl_s=10, clock=clock), CountingEngine()
    serve_rows(store, engine, [row("a", wire.OP_START, 1)])
    clock.now = 100.0
    answers = serve_rows(store, engine, [row("a", wire.OP_UPDATE, 1), row("x", wire.OP_START, -1)])
    assert answers[0][1] == wire.STATUS_UNKNOWN and isinstance(answers[1], Exception)
    assert "a" not in store and store.stats().expirations == 1


class NonFiniteEngine(CountingEngine):
    """A stage version that computes NaN for sessions sent 7 events."""

    def advance(self, batch):
        out = super().advance(batch)
        for (_, x), done in zip(batch, out, strict=True):
            if int(x[wire.EVENT_COUNT][0]) == 7:
                done.embedding[:] = np.nan
        return out


def test_a_non_finite_answer_is_our_error_and_never_stored():
    from dynemb.serving.adapter import NonFiniteOutputError
    from dynemb.sessions.serving import serve_rows

    store, engine = StateStore(), NonFiniteEngine()
    serve_rows(store, engine, [row("a", wire.OP_START, 1)])
    answers = serve_rows(
        store, engine, [row("a", wire.OP_UPDATE, 7), row("b", wire.OP_START, 2, request=1)]
    )
    assert isinstance(answers[0], NonFiniteOutputError)  # INTERNAL, not the caller's
    assert store.get("a", V1).n_events == 1  # as it was
    assert answers[1][1] == wire.STATUS_OK and store.get("b", V1).n_events == 2


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_session_options_must_be_finite(value):
    from dynemb.sessions.spec import SessionOptions

    for name in ("ttl_s", "max_mb", "max_users"):
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            SessionOptions.from_parameters({name: value})


# --- what the client refuses, and windows it does not hold whole ------------------------


def test_an_update_before_the_window_s_newest_is_refused_as_the_server_would():
    """Refused before sending, whether or not the server still holds the state: a restart
    (a whole history, sorted and cut at t) would otherwise take what an update may not."""
    from dynemb_client import ClientInputError

    histories = SessionHistories()
    histories.keep("u", events(10, 20, 30), 3)
    for new, at, field in ((events(15), 40, "EVENT_TIME"), ([], 25, "QUERY_TIME")):
        with pytest.raises(ClientInputError, match=field):
            next(update_steps(histories, "session", "u", new, at, SHAPE))
    # at the newest event's own time is fine, as on the server
    calls, _ = drive(update_steps(histories, "session", "u", events(30), 30, SHAPE), [ok(3)])
    assert sent_times(calls[0]) == [30]


def test_a_window_kept_only_in_part_is_never_restarted_from():
    """A session started elsewhere (another process): the server holds 41 events, this
    client 1. When the server loses the state, a restart from that one event would answer
    for another window: it is an error naming the fix, and the caller's history works."""
    from dynemb_client import SessionLostError

    histories = SessionHistories()
    drive(update_steps(histories, "session", "u", events(100), None, SHAPE), [ok(4)])
    assert histories.missing("u") == 3
    steps = update_steps(histories, "session", "u", events(101), None, SHAPE)
    with pytest.raises(SessionLostError, match="history="):
        drive(steps, [UNKNOWN])
    steps = update_steps(
        histories, "session", "u", events(101), None, SHAPE, history=events(97, 98, 99, 100)
    )
    calls, _ = drive(steps, [UNKNOWN, ok(3), ok(4)])
    assert sent_times(calls[1]) == [97, 98, 99, 100] and histories.missing("u") == 0
    # in an update_many the lost session fails alone; the others are updated
    histories.keep("v", events(1), 3)
    histories.keep("w", events(1), 1)
    steps = update_many_steps(
        histories, "session", {"v": events(2), "w": events(2)}, None, SHAPE, lambda s: "x:1"
    )
    with pytest.raises(SessionUpdateError) as raised:
        drive(steps, [[UNKNOWN, ok(2)]])
    assert set(raised.value.failed) == {"v"} and set(raised.value.applied) == {"w"}


def test_more_than_l_new_events_go_as_updates_of_at_most_l():
    """The wire carries L events: 9 new ones on a window of 3 (L = 4) are three updates,
    so the window is the one the events read one at a time, not the newest L alone."""
    histories = SessionHistories()
    histories.keep("u", events(1, 2, 3), 3)
    new = events(*range(4, 13))
    calls, _ = drive(
        update_steps(histories, "session", "u", new, None, SHAPE), [ok(4), ok(4), ok(4)]
    )
    assert [op(c) for c in calls] == [wire.OP_UPDATE] * 3
    assert [sent_times(c) for c in calls] == [[4, 5, 6, 7], [8, 9, 10, 11], [12]]
    assert kept_times(histories) == [9, 10, 11, 12]
    # a session the server never saw: a start, then the updates
    calls, _ = drive(
        update_steps(SessionHistories(), "session", "n", new, None, SHAPE),
        [UNKNOWN, ok(4), ok(4), ok(4)],
    )
    assert [op(c) for c in calls] == [wire.OP_UPDATE, wire.OP_START, wire.OP_UPDATE, wire.OP_UPDATE]
    # in an update_many such a session goes by itself, the others in one request
    histories.keep("v", events(1), 1)
    steps = update_many_steps(
        histories, "session", {"u": events(*range(13, 19)), "v": events(2)}, None, SHAPE,
        lambda s: "x:1",
    )  # fmt: skip
    calls, answers = drive(steps, [[ok(2)], ok(4), ok(4)])
    assert session_ids(calls[0]) == ["v"] and [sent_times(c) for c in calls[1:]] == [
        [13, 14, 15, 16],
        [17, 18],
    ]
    assert set(answers) == {"u", "v"}


def test_update_many_refuses_a_session_before_sending_and_updates_the_others():
    from dynemb_client import ClientInputError

    histories = SessionHistories()
    histories.keep("a", events(10), 1)
    histories.keep("b", events(10), 1)
    steps = update_many_steps(
        histories, "session", {"a": events(20), "b": events(5)}, None, SHAPE, lambda s: "x:1"
    )
    with pytest.raises(SessionUpdateError) as raised:
        drive(steps, [[ok(2)]])
    assert isinstance(raised.value.failed["b"], ClientInputError)
    assert set(raised.value.applied) == {"a"} and kept_times(histories, "b") == [10]


FAILED = ServerError("stage failed", model="session", status="INTERNAL")


def test_an_update_that_raised_is_not_resent_next_time_the_session_starts_again():
    """An update that failed with a server error may have been applied; the caller who
    sends its events again gets them counted once: the session starts from its kept
    window, plus them. An answer settles it: the update after is a plain one again."""
    histories = SessionHistories()
    histories.keep("u", events(1, 2), 2)
    steps = update_steps(histories, "session", "u", events(3), None, SHAPE)
    next(steps)
    with pytest.raises(ServerError, match="stage failed"):
        steps.throw(FAILED)
    assert histories.unsettled("u") and kept_times(histories) == [1, 2]
    calls, _ = drive(update_steps(histories, "session", "u", events(3), None, SHAPE), [ok(3)])
    assert [op(c) for c in calls] == [wire.OP_START] and sent_times(calls[0]) == [1, 2, 3]
    assert not histories.unsettled("u")
    calls, _ = drive(update_steps(histories, "session", "u", events(4), None, SHAPE), [ok(4)])
    assert [op(c) for c in calls] == [wire.OP_UPDATE] and sent_times(calls[0]) == [4]


def test_an_update_interrupted_in_flight_starts_the_session_again_next_time():
    """Ctrl-C or a cancelled task while an update is in flight: the steps are dropped
    where they stood (GeneratorExit), and the next update starts from the kept window."""
    histories = SessionHistories()
    histories.keep("u", events(1), 1)
    steps = update_steps(histories, "session", "u", events(2), None, SHAPE)
    next(steps)
    steps.close()
    calls, _ = drive(update_steps(histories, "session", "u", events(2), None, SHAPE), [ok(2)])
    assert op(calls[0]) == wire.OP_START and sent_times(calls[0]) == [1, 2]


def test_an_update_refused_or_answered_unknown_was_not_applied_and_is_settled():
    histories = SessionHistories()
    histories.keep("u", events(1), 1)
    steps = update_steps(histories, "session", "u", events(2), None, SHAPE)
    next(steps)
    with pytest.raises(ServerInputError):
        steps.throw(ServerInputError("bad", model="session", status="INVALID_ARGUMENT"))
    assert not histories.unsettled("u")


def test_a_many_update_whose_request_failed_names_its_sessions_and_keeps_the_others():
    """Two requests (two endpoints); the second fails with a server error. The first's
    sessions are updated and their E_t returned; the second's are named, unsettled, and
    sent again they start from their kept windows (never updated twice)."""
    from dynemb_client import PartialUpdateError

    histories = SessionHistories()
    for user in ("a", "b"):
        histories.keep(user, events(1), 1)
    route = {"a": "x:1", "b": "y:1"}.get
    steps = update_many_steps(
        histories, "session", {"a": events(2), "b": events(3)}, None, SHAPE, route
    )
    with pytest.raises(PartialUpdateError) as raised:
        drive(steps, [[ok(2)], FAILED])
    assert not isinstance(raised.value, ServerInputError)
    assert set(raised.value.applied) == {"a"} and raised.value.failed["b"] is FAILED
    assert kept_times(histories, "a") == [1, 2] and not histories.unsettled("a")
    assert histories.unsettled("b") and kept_times(histories, "b") == [1]
    steps = update_many_steps(histories, "session", {"b": events(3)}, None, SHAPE, route)
    calls, _ = drive(steps, [ok(2)])
    assert [op(c) for c in calls] == [wire.OP_START] and sent_times(calls[0]) == [1, 3]


def test_with_no_server_answering_a_many_update_stops_trying_and_keeps_what_was_answered():
    """The request was lost in transit and the first restart found no server: the rest of
    the restarts are not tried (each would wait out the deadline). A session whose answer
    came back OK in another request is still kept."""
    from dynemb_client import PartialUpdateError, ServerUnavailable

    histories = SessionHistories()
    for user in "abc":
        histories.keep(user, events(1), 1)
    route = {"a": "x:1", "b": "x:1", "c": "y:1"}.get
    steps = update_many_steps(
        histories, "session", {u: events(2) for u in "abc"}, None, SHAPE, route
    )
    down = ServerUnavailable("no server answered", model="session")
    with pytest.raises(PartialUpdateError) as raised:
        drive(steps, [LOST, [ok(2)], down])
    assert set(raised.value.failed) == {"a", "b"} and set(raised.value.applied) == {"c"}
    assert all(exc is down for exc in raised.value.failed.values())
    assert histories.unsettled("a") and histories.unsettled("b")


def test_a_many_update_with_bad_content_fails_that_session_alone():
    histories = SessionHistories()
    updates = {"good": events(1), "bad": [Event(1, b"\xff")], "\ud800": events(1)}
    steps = update_many_steps(histories, "session", updates, None, SHAPE, lambda s: "x:1")
    with pytest.raises(SessionUpdateError) as raised:
        drive(steps, [ok(1)])
    assert set(raised.value.failed) == {"bad", "\ud800"} and set(raised.value.applied) == {"good"}
    assert "UTF-8" in str(raised.value.failed["bad"])


def test_an_empty_many_update_sends_nothing_even_without_a_server():
    from dynemb_client import AsyncInterestClient, InterestClient

    with InterestClient("127.0.0.1:1") as client:
        assert client.update_many({}) == {}

    async def empty() -> dict:
        async with AsyncInterestClient("127.0.0.1:1") as client:
            return await client.update_many({})

    assert asyncio.run(empty()) == {}


def test_a_start_that_raised_is_unsettled_too():
    """The update was answered "no state" (not applied), then the start of the kept window
    with the new event timed out: the server may hold it now. Sent again, the event must
    not go as an update onto that window."""
    histories = SessionHistories()
    histories.keep("u", events(1), 1)
    steps = update_steps(histories, "session", "u", events(2), None, SHAPE)
    next(steps)
    start = steps.send([UNKNOWN])
    assert op(start) == wire.OP_START
    with pytest.raises(ServerError):
        steps.throw(ServerError("deadline", model="session", status="DEADLINE_EXCEEDED"))
    assert histories.unsettled("u")
    calls, _ = drive(update_steps(histories, "session", "u", events(2), None, SHAPE), [ok(2)])
    assert [op(c) for c in calls] == [wire.OP_START] and sent_times(calls[0]) == [1, 2]


def test_a_long_update_that_fails_partway_is_unsettled_as_a_whole():
    """More than L events go as several updates; the first was applied and kept, the
    second failed. Sent again whole, they start from the window before the update: none
    counted twice, and no "precedes the newest event" refusal."""
    histories = SessionHistories()
    histories.keep("u", events(1), 1)
    new = events(2, 3, 4, 5, 6)  # L = 4: updates of 4 and 1
    steps = update_steps(histories, "session", "u", new, None, SHAPE)
    next(steps)
    steps.send([ok(4)])
    with pytest.raises(ServerError):
        steps.throw(FAILED)
    assert kept_times(histories) == [1] and histories.unsettled("u")
    steps = update_steps(histories, "session", "u", new, None, SHAPE)
    calls, _ = drive(steps, [ok(1), ok(4), ok(4)])  # the kept window, then as the first time
    assert [op(c) for c in calls] == [wire.OP_START, wire.OP_UPDATE, wire.OP_UPDATE]
    assert [sent_times(c) for c in calls] == [[1], [2, 3, 4, 5], [6]]


def test_an_update_of_a_session_this_client_never_kept_is_not_restarted_from_nothing():
    """A window another process started, first seen by this client through an update that
    failed: starting it from nothing would replace its events by the new ones alone."""
    histories = SessionHistories()
    steps = update_steps(histories, "session", "u", events(2), None, SHAPE)
    next(steps)
    with pytest.raises(ServerError):
        steps.throw(FAILED)
    assert not histories.unsettled("u")
    calls, _ = drive(update_steps(histories, "session", "u", events(2), None, SHAPE), [ok(41)])
    assert [op(c) for c in calls] == [wire.OP_UPDATE]


def test_a_many_update_with_an_image_file_that_is_not_one_fails_that_session_alone(tmp_path):
    """The file exists (checked before sending) but is no image (found as the request is
    built): the other sessions are still updated and their E_t returned."""
    (tmp_path / "notes.png").write_text("not an image")
    histories = SessionHistories()
    updates = {"good": events(1), "bad": [Event(1, "x", image=tmp_path / "notes.png")]}
    steps = update_many_steps(histories, "session", updates, None, SHAPE, lambda s: "x:1")
    with pytest.raises(SessionUpdateError) as raised:
        drive(steps, [ok(1)])
    assert set(raised.value.failed) == {"bad"} and set(raised.value.applied) == {"good"}


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_update_of_several_runs_interrupted_in_its_second_keeps_the_window_before(
    monkeypatch, asynchronous
):
    """Ctrl-C or a cancelled task during the second run of an update of more than L
    events: the first run was applied, so the update as a whole failed; the client puts
    back the window before it, unsettled, at once (it had waited for the steps to be
    garbage-collected, so a retry in the `except` block was refused and the next event
    read a window with the first run only)."""
    from types import SimpleNamespace

    import dynemb_client.aio as aio_mod
    import dynemb_client.client as client_mod
    from dynemb_client import AsyncInterestClient, InterestClient

    histories = SessionHistories()
    histories.keep("u", events(1, 2, 3), 3)
    answers = iter([[ok(4)]])
    stop = asyncio.CancelledError if asynchronous else KeyboardInterrupt

    def infer(*_a, **_k):
        answer = next(answers, None)
        if answer is None:
            raise stop
        return answer

    async def ainfer(*_a, **_k):
        return infer()

    for module in (client_mod, aio_mod):
        monkeypatch.setattr(module, "parse_sessions", lambda result, model, batch: result)
    fake = SimpleNamespace(
        _pool=SimpleNamespace(route=lambda route: "a:1"),
        _infer=ainfer if asynchronous else infer,
        sessions=histories,
    )
    steps = update_steps(histories, "session", "u", events(4, 5, 6, 7, 8, 9), None, SHAPE)
    with pytest.raises(stop):
        if asynchronous:
            asyncio.run(AsyncInterestClient._session(fake, steps))
        else:
            InterestClient._session(fake, steps)
    assert kept_times(histories) == [1, 2, 3] and histories.unsettled("u")
    calls, _ = drive(update_steps(histories, "session", "u", events(4), None, SHAPE), [ok(4)])
    assert op(calls[0]) == wire.OP_START and sent_times(calls[0]) == [1, 2, 3, 4]


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize(
    "session", ["\ud800", "", 42, "x" * 257], ids=["surrogate", "empty", "int", "long"]
)
def test_a_bad_session_id_is_refused_by_every_session_call_before_anything_is_sent(
    asynchronous, session
):
    """A lone surrogate reached the endpoint routing, which hashes the id's UTF-8, and
    `update`, `embed_user` and `recommend_user` raised a bare UnicodeEncodeError."""
    from dynemb_client import AsyncInterestClient, ClientInputError, InterestClient

    client = (AsyncInterestClient if asynchronous else InterestClient)(
        urls=["127.0.0.1:9", "127.0.0.1:10"]
    )
    client._shape = client._session_shape = SHAPE  # no server: nothing may be sent
    calls = {
        "update": lambda: client.update(session, events(1)),
        "embed_user": lambda: client.embed_user(session),
        "recommend_user": lambda: client.recommend_user(session),
        "update_many": lambda: client.update_many({session: events(1)}),
        "forget": lambda: client.forget(session),
    }
    for name, call in calls.items():
        with pytest.raises((ClientInputError, SessionUpdateError)) as raised:
            asyncio.run(call()) if asynchronous else call()
        found = raised.value
        if isinstance(found, SessionUpdateError):
            found = found.failed[session]
        assert isinstance(found, ClientInputError) and found.field == wire.SESSION_ID, name


def test_events_another_writer_added_past_the_window_make_the_kept_window_partial():
    """Two clients take turns on one session past the window (L = 4, B = 2 here: the
    window holds 3, 4, 3, ... events). Their windows' lengths agree with the server's, so
    the count of events held could not show that the other had added one: each kept a
    window with an event the server had re-windowed away and without the other's. The
    count of events read since the start (SESSION_READ) does: each keeps only the events
    it sent, and after a server loss says it cannot restart the session alone."""
    from dynemb_client import SessionLostError

    histories = SessionHistories()
    histories.keep("u", events(1, 2, 3, 4), 4, read=4)
    drive(update_steps(histories, "session", "u", events(5), None, SHAPE), [ok(3, 5)])
    assert kept_times(histories) == [3, 4, 5] and histories.missing("u") == 0
    # another writer sent 6: the server read 7 events, this client 6
    drive(update_steps(histories, "session", "u", events(7), None, SHAPE), [ok(3, 7)])
    assert kept_times(histories) == [7] and histories.missing("u") == 2
    with pytest.raises(SessionLostError):
        drive(update_steps(histories, "session", "u", events(8), None, SHAPE), [UNKNOWN])
    # history= stands for the session's events, whatever count the server has (it reads
    # the newest L of a history at a start, and counts from its last start); its count
    # is what later updates are checked against
    joined = SessionHistories()
    history = events(1, 2, 3, 4, 5, 6)
    drive(update_steps(joined, "session", "v", events(7), None, SHAPE, history), [ok(4, 9)])
    assert kept_times(joined, "v") == [4, 5, 6, 7] and joined.missing("v") == 0
    drive(update_steps(joined, "session", "v", events(8), None, SHAPE, [*history, *events(7)]),
          [ok(3, 10)])  # fmt: skip
    assert kept_times(joined, "v") == [6, 7, 8] and joined.read("v") == 10
    drive(update_steps(joined, "session", "v", events(9), None, SHAPE), [ok(4, 12)])
    assert kept_times(joined, "v") == [9] and joined.missing("v") == 3  # someone added one
    # a server that does not answer SESSION_READ: as before, lengths only
    old = SessionHistories()
    old.keep("u", events(1, 2, 3, 4), 4)
    drive(update_steps(old, "session", "u", events(5), None, SHAPE), [ok(3)])
    assert kept_times(old) == [3, 4, 5]


def test_the_read_count_is_asked_for_only_from_a_session_model_that_answers_it():
    from dataclasses import replace

    def outputs(shape):
        return [o.name() for o in session_call("session", "u", 0, [], 1.0, shape).outputs]

    assert wire.SESSION_READ not in outputs(SHAPE)
    assert wire.SESSION_READ in outputs(replace(SHAPE, session_read=True))


def test_an_endpoint_of_an_older_build_is_sent_the_call_again_without_the_read_count(
    monkeypatch,
):
    """In a rolling upgrade a client that read a new endpoint's metadata asks an old one
    for SESSION_READ, which it refuses as an unknown output (so the call was not
    applied): the call goes again without it, and no later call asks for it."""
    from dataclasses import replace
    from functools import partial
    from types import SimpleNamespace

    import dynemb_client.client as client_mod
    from dynemb_client import InterestClient
    from dynemb_client.transport import ClientBase

    histories = SessionHistories()
    histories.keep("u", events(1, 2), 2, read=2)
    sent = []

    def infer(call, retry=True):
        asked = [o.name() for o in call.outputs]
        sent.append(asked)
        if wire.SESSION_READ in asked:
            raise ServerInputError(
                "unexpected inference output 'SESSION_READ' for model 'session'",
                model="session",
                status="INVALID_ARGUMENT",
            )
        return [ok(3)]

    monkeypatch.setattr(client_mod, "parse_sessions", lambda result, model, batch: result)
    fake = SimpleNamespace(
        _pool=SimpleNamespace(route=lambda route: "old:1"),
        _infer=infer,
        sessions=histories,
        _read_count_refused=False,
    )
    fake._without_refused_output = partial(ClientBase._without_refused_output, fake)
    shape = replace(SHAPE, session_read=True)
    answer = InterestClient._session(
        fake, update_steps(histories, "session", "u", events(3), None, shape)
    )
    assert answer.events_held == 3 and kept_times(histories) == [1, 2, 3]
    assert len(sent) == 2 and wire.SESSION_READ not in sent[1] and fake._read_count_refused

    # any other refusal is the caller's, as before
    def refuse(call, retry=True):
        raise ServerInputError("EVENT_TIME[0]: bad", model="session", status="INVALID_ARGUMENT")

    fake._infer = refuse
    with pytest.raises(ServerInputError, match="EVENT_TIME"):
        InterestClient._session(
            fake, update_steps(histories, "session", "u", events(4), None, shape)
        )
