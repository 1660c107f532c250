"""Sessions: E_t advanced event by event equals the full recompute (in-process here, on
the trained synthetic repository: images, texts, labels), across batches and past L."""

from __future__ import annotations

import random
import shutil
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dynemb.data.synthetic import draw_item_image
from dynemb.pipeline import Pipeline
from dynemb.server import ServerConfig, TritonServer, free_port
from dynemb.sessions.engine import SessionEngine
from dynemb.sessions.state import window_after
from dynemb.swap.candidates import make_candidate
from dynemb.swap.swapper import Swapper
from dynemb_client import (
    ClientInputError,
    Event,
    InterestClient,
    ServerInputError,
    build_inputs,
)

T0 = 1_700_000_000.0
TOL = 1e-4


def stream(seed: int, n: int, images: bool = True) -> list[Event]:
    """A user's events, some with images, some sharing a time, labels with ratings."""
    rng = random.Random(seed)
    t, out = T0, []
    for _ in range(n):
        t += rng.choice([0, 60, 3_600, 86_400, 9 * 86_400])
        image = (
            draw_item_image(rng.randrange(6), rng, 32) if images and rng.random() < 0.5 else None
        )
        labels = [f"category:c{rng.randrange(6)}", f"rating:{rng.randrange(1, 6)}"]
        out.append(Event(t, f"item {rng.randrange(40)} lamp", image, labels[: rng.randrange(3)]))
    return out


def wire(events: list[Event], at: float, shape) -> dict[str, np.ndarray]:
    x = build_inputs([events], [at], shape.max_events, shape.max_labels)
    return {k: v[0] for k, v in x.items()}


@pytest.fixture(scope="module")
def engine(built_repository) -> SessionEngine:
    return SessionEngine.from_repository(built_repository)


@pytest.fixture(scope="module")
def shape(engine):
    from dynemb_client import ModelShape

    return ModelShape(engine.dims.max_events, engine.dims.max_labels)


def full(pipeline: Pipeline, events: list[Event], at: float, shape) -> np.ndarray:
    x = build_inputs([events], [at], shape.max_events, shape.max_labels)
    return pipeline.embed(x)[0]


def test_event_by_event_equals_the_full_recompute(engine, pipeline, shape):
    users = [stream(s, n, images=s % 2 == 0) for s, n in enumerate((0, 1, 7, 23, 50))]
    states = [None] * len(users)
    worst = 0.0
    for step in range(max(map(len, users)) + 1):
        batch, who = [], []
        for u, events in enumerate(users):
            if step < len(events) or (step == 0 and not events):
                new = events[step : step + 1]
                at = new[-1].time + 30 if new else T0
                batch.append((states[u], wire(new, at, shape)))
                who.append((u, at))
        if not batch:
            break
        for (u, at), done in zip(who, engine.advance(batch), strict=True):
            states[u] = done.state
            expected = full(pipeline, users[u][: step + 1], at, shape)
            worst = max(worst, float(np.abs(done.embedding - expected).max()))
    assert worst < TOL, worst


def test_a_whole_history_at_once_and_a_later_query_time(engine, pipeline, shape):
    events = stream(11, 30)
    [started] = engine.advance([(None, wire(events[:20], events[19].time, shape))])
    at = events[-1].time + 7_200
    [later] = engine.advance([(started.state, wire(events[20:], at, shape))])
    assert np.abs(later.embedding - full(pipeline, events, at, shape)).max() < TOL
    # No new events: only the query time moves.
    [moved] = engine.advance([(later.state, wire([], at + 86_400, shape))])
    expected = full(pipeline, events, at + 86_400, shape)
    assert np.abs(moved.embedding - expected).max() < TOL
    assert moved.state.n_events == 30


def test_past_the_window_with_block_one_it_is_the_newest_l_events(
    built_repository, pipeline, shape
):
    engine = SessionEngine.from_repository(built_repository, rewindow_block=1)
    events = stream(5, engine.dims.max_events + 9)
    [done] = engine.advance([(None, wire(events[:45], events[44].time, shape))])
    state = done.state
    for i in range(45, len(events)):
        [done] = engine.advance([(state, wire(events[i : i + 1], events[i].time, shape))])
        state = done.state
        window = events[max(0, i + 1 - engine.dims.max_events) : i + 1]
        expected = full(pipeline, window, events[i].time, shape)
        assert np.abs(done.embedding - expected).max() < TOL, i
    assert state.n_events == engine.dims.max_events
    # A full window keeps only what re-windowing reads: no keys and values.
    assert state.windowed and state.nbytes < 100_000, state.nbytes


@pytest.mark.parametrize("block", [7, 25])
def test_past_the_window_e_t_is_exactly_the_window_s_events(
    built_repository, pipeline, shape, block
):
    """Streamed one event at a time and in groups of three, two users in one batch: every
    answer is the full recompute of the window the rule says the session holds, and
    between re-windows the session steps (keys and values kept)."""
    engine = SessionEngine.from_repository(built_repository, rewindow_block=block)
    max_l = engine.dims.max_events
    users = [
        stream(40 + block, max_l + 2 * block + 3, images=True),
        stream(41, max_l + 2 * block + 3),
    ]
    states, held, worst = [None, None], [0, 0], 0.0
    start = 44
    for u, events in enumerate(users):
        [done] = engine.advance([(None, wire(events[:start], events[start - 1].time, shape))])
        states[u], held[u] = done.state, start
    cursor, group = [start, start], [1, 3]
    while any(c < len(users[u]) for u, c in enumerate(cursor)):
        batch, who = [], []
        for u, events in enumerate(users):
            new = events[cursor[u] : cursor[u] + group[u]]
            if new:
                batch.append((states[u], wire(new, new[-1].time, shape)))
                who.append((u, new))
        for (u, new), done in zip(who, engine.advance(batch), strict=True):
            size = window_after(held[u], len(new), max_l, block)
            cursor[u] += len(new)
            window = users[u][cursor[u] - size : cursor[u]]
            expected = full(pipeline, window, new[-1].time, shape)
            worst = max(worst, float(np.abs(done.embedding - expected).max()))
            assert done.state.n_events == size
            if size < max_l:
                assert not done.state.windowed and done.state.keys.shape[2] == size + 1
            states[u], held[u] = done.state, size
    assert worst < TOL, worst


def test_bad_input_fails_alone(engine, shape):
    events = stream(3, 5)
    [start] = engine.advance([(None, wire(events, events[-1].time, shape))])
    early = wire([Event(T0 - 10, "too early")], T0, shape)
    future = wire([Event(events[-1].time + 100, "later")], events[-1].time + 100, shape)
    future["QUERY_TIME"] = np.array([events[-1].time])  # before the new event
    good = wire([Event(events[-1].time + 5, "fine")], events[-1].time + 5, shape)
    results = engine.advance([(start.state, early), (start.state, future), (start.state, good)])
    assert "EVENT_TIME[0]" in str(results[0]) and "precedes" in str(results[0])
    assert "QUERY_TIME" in str(results[1])
    assert results[2].state.n_events == 6


# --- served: the `session` model through the project's client ------------------------


def served_users():
    return [stream(s, n, images=s % 2 == 1) for s, n in ((21, 6), (22, 14), (23, 3))]


def stream_all(client, users, prefix: str) -> float:
    """Every user's events one update at a time, users interleaved (concurrently, so the
    session model batches them); the largest |E_t - user_interest(history)|."""
    worst = 0.0

    def one(u: int) -> float:
        gap = 0.0
        for i, event in enumerate(users[u]):
            got = client.update(f"{prefix}{u}", [event])
            want = client.embed(users[u][: i + 1])
            gap = max(gap, float(np.abs(got - want).max()))
        return gap

    with ThreadPoolExecutor(len(users)) as pool:
        for gap in pool.map(one, range(len(users))):
            worst = max(worst, gap)
    return worst


def test_served_updates_equal_the_ensemble(live):
    users = served_users()
    with InterestClient(live.url) as client:
        assert stream_all(client, users, "equal-") < TOL
        # No new events, a later query time; and recommend on the session.
        at = users[1][-1].time + 3_600
        np.testing.assert_allclose(
            client.embed_user("equal-1", at=at), client.embed(users[1], at=at), atol=TOL
        )
        seen = {"item 3 lamp"}
        mine = client.recommend_user("equal-1", k=5, at=at, exclude=seen)
        theirs = client.recommend(users[1], k=5, at=at, exclude=seen)
        assert [r.item_id for r in mine] == [r.item_id for r in theirs]


def test_a_forgotten_or_unknown_session_is_rebuilt_from_the_kept_history(live):
    users = served_users()
    with InterestClient(live.url) as client, InterestClient(live.url) as other:
        stream_all(client, users[:1], "forget-")
        other.forget("forget-0")  # the server drops it; this client still keeps its events
        extra = Event(users[0][-1].time + 60, "one more", None, ["category:c1"])
        got = client.update("forget-0", [extra])
        np.testing.assert_allclose(got, client.embed([*users[0], extra]), atol=TOL)
        # A caller that keeps its own history (a fresh client knows nothing).
        fresh = InterestClient(live.url)
        later = Event(extra.time + 60, "and another")
        other.forget("forget-0")
        got = fresh.update("forget-0", [later], history=[*users[0], extra])
        np.testing.assert_allclose(got, client.embed([*users[0], extra, later]), atol=TOL)
        fresh.close()


def test_two_clients_taking_turns_past_the_window_never_restart_a_wrong_window(live):
    """A writes 0-49, B joins with the same history; past the window A adds 50 and B 51.
    The window holds 25-51 (27 events): as many as B would hold from its own view
    (24-49 and 51), so before the server counted the events read, B kept that wrong
    window and, once the state was lost, restarted from it (E_t off by 0.03). Now B
    keeps only what it sent, and a loss is SessionLostError until it passes history=."""
    from dynemb_client import SessionLostError

    h = stream(31, 53, images=False)
    uid = "turns-0"
    with (
        InterestClient(live.url) as a,
        InterestClient(live.url) as b,
        InterestClient(live.url) as other,
    ):
        a.update(uid, h[:50])
        b.update(uid, [], history=h[:50])  # the server read as many: B's history is it
        assert b.sessions.get(uid) == h[:50] and b.sessions.missing(uid) == 0
        a.update(uid, [h[50]])
        got = b.update(uid, [h[51]])
        np.testing.assert_allclose(got, a.embed(h[25:52]), atol=TOL)
        assert b.sessions.get(uid) == [h[51]] and b.sessions.missing(uid) == 26
        other.forget(uid)  # the server loses the state
        with pytest.raises(SessionLostError):
            b.update(uid, [h[52]])
        got = b.update(uid, [h[52]], history=h[:52])
        window = b.sessions.get(uid)
        assert window == h[53 - len(window) :] and b.sessions.missing(uid) == 0
        np.testing.assert_allclose(got, a.embed(window), atol=TOL)


def test_bad_session_input_is_invalid_argument(live):
    """Refused by the server, and by a client that keeps the session's window before
    sending (a restart would otherwise take what an update may not)."""
    with InterestClient(live.url) as client, InterestClient(live.url) as other:
        client.update("bad-0", [Event(T0 + 100, "first")])
        with pytest.raises(ClientInputError, match="EVENT_TIME"):
            client.update("bad-0", [Event(T0, "before the newest")])
        with pytest.raises(ClientInputError, match="QUERY_TIME"):
            client.update("bad-0", [Event(T0 + 200, "x")], at=T0 + 150)
        with pytest.raises(ClientInputError, match="QUERY_TIME"):
            client.embed_user("bad-0", at=T0 + 50)
        # `other` keeps nothing of bad-0: the server itself refuses.
        with pytest.raises(ServerInputError, match="EVENT_TIME"):
            other.update("bad-0", [Event(T0, "before the newest")])
        with pytest.raises(ServerInputError, match="QUERY_TIME"):
            other.embed_user("bad-0", at=T0 + 50)
        # The session is intact after every refusal.
        got = client.update("bad-0", [Event(T0 + 300, "fine")])
        want = client.embed([Event(T0 + 100, "first"), Event(T0 + 300, "fine")])
        np.testing.assert_allclose(got, want, atol=TOL)


def test_a_swap_drops_every_state_and_answers_stay_exact(live, tmp_path):
    """Every answer during and after a swap is one version's exact answer: the old one's
    until the session model sees the swap (within its version check), the new one's
    after, and never a state of one version advanced by the other."""
    users = served_users()
    swapper = Swapper(live.repository, live.url, token=live.token)
    with InterestClient(live.url) as client:
        stream_all(client, users, "swap-")
        at = users[0][-1].time + 600
        x = build_inputs([users[0]], [at], 50, 8)
        old = swapper.current_pipeline().embed(x)[0]
        stale_before = session_counter(live, "stale")
        candidate = make_candidate(live.repository, "label_mlp", tmp_path / "c", scale=0.2)
        swapper.swap("label_mlp", candidate, accept_drift=True)
        try:
            new = swapper.current_pipeline().embed(x)[0]  # every stage at its new version
            assert np.abs(new - old).max() > 1e-3
            deadline = time.monotonic() + 10
            while True:
                got = client.embed_user("swap-0", at=at)
                gap_new, gap_old = np.abs(got - new).max(), np.abs(got - old).max()
                assert min(gap_new, gap_old) < TOL, (gap_new, gap_old)
                if gap_new < TOL:
                    break
                assert time.monotonic() < deadline, "the session model never saw the swap"
                time.sleep(0.05)
            extra = Event(users[0][-1].time + 60, "after the swap", None, ["category:c2"])
            got = client.update("swap-0", [extra], at=at)
            want = swapper.current_pipeline().embed(
                build_inputs([[*users[0], extra]], [at], 50, 8)
            )[0]
            assert np.abs(got - want).max() < TOL
            assert session_counter(live, "stale", above=stale_before) > stale_before
        finally:
            swapper.rollback("label_mlp")


def session_counter(live, stat: str, above: float | None = None) -> float:
    """The counter (0 if not published yet); with `above`, once it is above that, or as it
    is after 10 s (the session model publishes once a second, from a thread of its own)."""
    url = f"http://127.0.0.1:{live.config.metrics_port}/metrics"
    deadline = time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        value = next(
            (
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(f"dynemb_session_{stat}_total{{")
            ),
            None,
        )
        done = value is not None and (above is None or value > above)
        if done or time.monotonic() > deadline:
            return value or 0.0
        time.sleep(0.1)


def test_a_restarted_server_loses_states_not_answers(built_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(built_repository, repository)
    config = ServerConfig(
        repository=repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path / "tritonserver.log",
        startup_timeout_s=240,
    )
    users = served_users()
    pipeline = Pipeline.from_repository(repository)
    # One client across the restart: it keeps its sessions' histories, the server not.
    with InterestClient(config.grpc_url, retry_deadline_s=120) as client:
        with TritonServer(config):
            stream_all(client, users[:2], "restart-")
        with TritonServer(config):
            extra = Event(users[1][-1].time + 5, "after restart")
            got = client.update("restart-1", [extra])
            want = full(pipeline, [*users[1], extra], extra.time, client.model_shape())
            assert np.abs(got - want).max() < TOL


def test_the_asyncio_client_streams_the_same(live):
    import asyncio

    from dynemb_client import AsyncInterestClient

    events = served_users()[1]

    async def run() -> float:
        async with AsyncInterestClient(live.url) as client:
            worst = 0.0
            for i, event in enumerate(events):
                got = await client.update("async-0", [event])
                want = await client.embed(events[: i + 1])
                worst = max(worst, float(np.abs(got - want).max()))
            top = await client.recommend_user("async-0", k=3)
            assert [r.item_id for r in top] == [
                r.item_id for r in await client.recommend(events, k=3)
            ]
            await client.forget("async-0")
            assert "async-0" not in client.sessions
            return worst

    assert asyncio.run(run()) < TOL


def test_update_many_streams_past_the_window_and_equals_each_window(live):
    """Four users (two with images) streamed through update_many, in steps of one or two
    events each, well past L: every answer equals the ensemble over exactly the window
    the session holds (the newest events the client keeps), and the asyncio client's
    batch answers as the sync one's."""
    import asyncio

    from dynemb_client import AsyncInterestClient

    users = {f"many-{s}": stream(60 + s, 70, images=s % 2 == 0) for s in range(4)}
    cursors = dict.fromkeys(users, 0)
    worst = 0.0
    with InterestClient(live.url) as client:
        while any(c < len(users[u]) for u, c in cursors.items()):
            batch = {}
            for u, c in cursors.items():
                step = 1 + (hash(u) + c) % 2
                if c < len(users[u]):
                    batch[u] = users[u][c : c + step]
                    cursors[u] = min(len(users[u]), c + step)
            got = client.update_many(batch)
            for u, e_t in got.items():
                window = client.sessions.get(u)
                assert window[-1] == users[u][cursors[u] - 1] and len(window) <= 50
                worst = max(worst, float(np.abs(e_t - client.embed(window)).max()))
        lengths = {len(client.sessions.get(u)) for u in users}
        assert max(lengths) <= 50 and min(lengths) < 50  # they re-windowed

    async def batch_async() -> dict[str, np.ndarray]:
        async with AsyncInterestClient(live.url) as aclient:
            return await aclient.update_many({f"a{u}": events[:3] for u, events in users.items()})

    sync_answers = InterestClient(live.url).update_many(
        {f"s{u}": events[:3] for u, events in users.items()}
    )
    for u, e_t in asyncio.run(batch_async()).items():
        np.testing.assert_allclose(e_t, sync_answers[f"s{u[1:]}"], atol=TOL)
    assert worst < TOL, worst


def test_update_many_refuses_only_the_bad_sessions(live):
    from dynemb_client import SessionUpdateError

    with InterestClient(live.url) as client:
        client.update_many({"mb-a": [Event(T0 + 100, "a1")], "mb-b": [Event(T0 + 100, "b1")]})
        with pytest.raises(SessionUpdateError) as raised:
            client.update_many(
                {"mb-a": [Event(T0 + 200, "a2")], "mb-b": [Event(T0 + 50, "before b's newest")]}
            )
        assert list(raised.value.failed) == ["mb-b"] and "EVENT_TIME" in str(raised.value)
        want = client.embed([Event(T0 + 100, "a1"), Event(T0 + 200, "a2")])
        np.testing.assert_allclose(raised.value.applied["mb-a"], want, atol=TOL)
        # b is intact: its next good event is answered from its window of one event.
        got = client.update("mb-b", [Event(T0 + 300, "b2")])
        want = client.embed([Event(T0 + 100, "b1"), Event(T0 + 300, "b2")])
        np.testing.assert_allclose(got, want, atol=TOL)
