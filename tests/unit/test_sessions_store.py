"""The session store's bounds and version tags, and the client's session steps (sans I/O:
answers fed in by hand, so the fallback paths are exercised without a server)."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from dynemb.sessions.state import SessionState, StateStore
from dynemb_client import Event, ModelShape, ServerError
from dynemb_client import contract as wire
from dynemb_client.sessions import SessionAnswer, SessionHistories, update_steps

V1 = (("text_rnn", "1"),)
V2 = (("text_rnn", "2"),)


def state(n: int = 3, versions=V1) -> SessionState:
    return SessionState(
        versions=versions,
        times=np.arange(n, dtype=np.float64),
        labels=[[]] * n,
        ratings=np.full(n, np.nan),
        raw_labels=[()] * n,
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


def test_forget_and_clear():
    store = StateStore()
    store.put("a", state())
    store.put("b", state())
    assert store.forget("a") and not store.forget("a")
    store.clear()
    assert len(store) == 0 and store.stats().bytes == 0


SHAPE = ModelShape(max_events=4, max_labels=2)
OK = SessionAnswer(np.ones(3, np.float32), wire.STATUS_OK, 1)
UNKNOWN = SessionAnswer(np.zeros(3, np.float32), wire.STATUS_UNKNOWN, 0)


def events(*times: float) -> list[Event]:
    return [Event(t, f"e{t}") for t in times]


def sent_events(call) -> int:
    count = next(i for i in call.inputs if i.name() == wire.EVENT_COUNT)
    return count._raw_content and int(np.frombuffer(count._raw_content, np.int32)[0])


def op(call) -> int:
    found = next(i for i in call.inputs if i.name() == wire.SESSION_OP)
    return int(np.frombuffer(found._raw_content, np.int32)[0])


def drive(steps, answers):
    """Feed answers (or exceptions) to the steps; the calls they made."""
    calls = [next(steps)]
    try:
        for answer in answers:
            if isinstance(answer, Exception):
                calls.append(steps.throw(answer))
            else:
                calls.append(steps.send(answer))
    except StopIteration as done:
        return calls, done.value
    raise AssertionError("the steps wanted more answers")


def test_an_update_sends_only_the_new_events():
    histories = SessionHistories()
    histories.extend("u", events(1, 2, 3), SHAPE.max_events)
    calls, answer = drive(update_steps(histories, "session", "u", events(4), None, SHAPE), [OK])
    assert len(calls) == 1 and op(calls[0]) == wire.OP_UPDATE and sent_events(calls[0]) == 1
    assert not calls[0].retry_safe
    assert answer is OK and [e.time for e in histories.get("u")] == [1, 2, 3, 4]


def test_an_unknown_session_gets_the_kept_history_cut_to_l():
    histories = SessionHistories()
    histories.extend("u", events(1, 2, 3), SHAPE.max_events)
    steps = update_steps(histories, "session", "u", events(4, 5), None, SHAPE)
    calls, _ = drive(steps, [UNKNOWN, OK])
    assert op(calls[1]) == wire.OP_START and sent_events(calls[1]) == 4  # the newest L
    assert calls[1].retry_safe
    assert [e.time for e in histories.get("u")] == [2, 3, 4, 5]


def test_a_transient_failure_of_an_update_starts_over_instead_of_resending_it():
    histories = SessionHistories()
    histories.extend("u", events(1), SHAPE.max_events)
    lost = InferenceServerException("connection reset", status="StatusCode.UNAVAILABLE")
    calls, _ = drive(update_steps(histories, "session", "u", events(2), None, SHAPE), [lost, OK])
    assert [op(c) for c in calls] == [wire.OP_UPDATE, wire.OP_START]
    assert sent_events(calls[1]) == 2


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
    histories.extend("u", events(1), SHAPE.max_events)
    steps = update_steps(histories, "session", "u", events(9), None, SHAPE, history=events(5, 6))
    calls, _ = drive(steps, [UNKNOWN, OK])
    assert sent_events(calls[1]) == 3


def test_histories_are_bounded_least_recent_first():
    histories = SessionHistories(max_sessions=2)
    for user in "abc":
        histories.extend(user, events(1), 4)
    assert "a" not in histories and len(histories) == 2


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


def row(session: str, op: int, k: int = 1):
    from dynemb.sessions.serving import _Row

    return _Row(0, session, op, {wire.EVENT_COUNT: np.array([k])})


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
