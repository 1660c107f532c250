"""Client-side balancing: least outstanding, failover, probing back, session routes."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

import dynemb_client.transport as transport_mod
from dynemb_client import Event, InterestClient, ServerInputError
from dynemb_client.contract import OP_START, OP_UPDATE, SESSION_OP
from dynemb_client.requests import ModelShape
from dynemb_client.sessions import SessionHistories, update_steps
from dynemb_client.transport import EndpointPool
from tests.unit.test_client_transport import HISTORY, fake_server, sleeps, unavailable

__all__ = ["sleeps"]  # the fixture, shared

URLS = ["a:1", "b:1", "c:1"]


class Probe:
    """A scripted readiness probe: the urls in `ready` answer ready."""

    def __init__(self) -> None:
        self.ready: set[str] = set()
        self.asked = threading.Event()

    def __call__(self, url: str) -> bool:
        self.asked.set()
        return url in self.ready


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_least_outstanding_then_in_turn() -> None:
    pool = EndpointPool(URLS, lambda url: url)
    held = [pool.acquire()[0] for _ in range(3)]
    assert sorted(held) == URLS  # one each before any gets a second
    pool.release("b:1")
    assert pool.acquire()[0] == "b:1"  # the only one with nothing in flight
    assert [e.outstanding for e in pool.endpoints()] == [1, 1, 1]
    assert [e.calls for e in pool.endpoints()] == [1, 2, 1]


def test_a_transient_failure_marks_down_and_a_probe_brings_back_on_a_new_channel() -> None:
    made: list[str] = []
    probe = Probe()
    pool = EndpointPool(
        URLS,
        lambda url: made.append(url) or f"{url}#{len(made)}",
        probe=probe,
        probe_interval_s=0.01,
    )
    url, first = pool.acquire()
    pool.release(url, unavailable())
    down = {e.url: e for e in pool.endpoints()}[url]
    assert not down.healthy and down.failures == 1 and "failed to connect" in down.last_error
    assert down.down_s is not None and down.down_s >= 0
    assert pool.healthy_besides(url)
    assert url not in {pool.acquire()[0] for _ in range(20)}
    probe.asked.wait(5)
    assert not {e.url: e for e in pool.endpoints()}[url].healthy  # not ready: stays down
    probe.ready.add(url)
    wait_for(lambda: {e.url: e for e in pool.endpoints()}[url].healthy)
    with pool.probing(url) as channel:
        assert channel != first  # a channel that saw the server die is not reused
    assert first in pool.opened()  # ... but it is closed with the pool


def test_an_answer_that_is_not_transient_keeps_the_endpoint() -> None:
    pool = EndpointPool(URLS, lambda url: url)
    url, _ = pool.acquire()
    pool.release(url, ValueError("bad input"))
    assert all(e.healthy for e in pool.endpoints())


def test_all_down_still_tries_each_in_turn() -> None:
    pool = EndpointPool(URLS, lambda url: url, probe=Probe(), probe_interval_s=60)
    for _ in URLS:
        pool.release(pool.acquire()[0], unavailable())
    assert not any(e.healthy for e in pool.endpoints())
    tried = []
    for _ in range(3):  # each still failing
        url, _ = pool.acquire()
        tried.append(url)
        pool.release(url, unavailable())
    assert sorted(tried) == URLS
    url, _ = pool.acquire()
    pool.release(url)  # this one answered: the next calls go there
    assert [e.url for e in pool.endpoints() if e.healthy] == [url]
    assert pool.acquire()[0] == url
    pool.opened()


def test_routes_stick_and_only_the_down_endpoints_routes_move() -> None:
    pool = EndpointPool(URLS, lambda url: url, probe=Probe(), probe_interval_s=60)
    routes = {f"user-{i}": pool.route(f"user-{i}") for i in range(300)}
    assert set(routes.values()) == set(URLS)  # spread over all
    assert all(pool.acquire(r)[0] == u for r, u in routes.items())
    pool.release("b:1", unavailable())
    after = {r: pool.route(r) for r in routes}
    assert all(after[r] == u for r, u in routes.items() if u != "b:1")
    assert all(after[r] != "b:1" for r in routes)
    pool.opened()


def test_the_client_fails_over_at_once_and_reports_its_endpoints(monkeypatch, sleeps) -> None:
    probe = Probe()
    monkeypatch.setattr(transport_mod, "server_ready", probe)
    server = fake_server(monkeypatch)
    client = InterestClient(urls=URLS, probe_interval_s=0.01)
    client.model_shape()
    server.failures = [unavailable()]
    client.embed(HISTORY)
    failed = server.calls[1][0]
    assert server.calls[2][0] != failed and sleeps == []  # retried elsewhere, no waiting
    for _ in range(6):
        client.embed(HISTORY)
    assert failed not in {url for url, _ in server.calls[3:]}
    state = {e.url: e for e in client.endpoints()}
    assert not state[failed].healthy and state[failed].failures == 1
    assert all(e.outstanding == 0 for e in state.values())
    probe.ready.add(failed)
    wait_for(lambda: all(e.healthy for e in client.endpoints()))
    before = len(server.calls)
    for _ in range(6):
        client.embed(HISTORY)
    assert failed in {url for url, _ in server.calls[before:]}
    client.close()
    assert server.closed.count(failed) == 2  # the old channel and the new one


def test_a_moved_session_starts_from_its_kept_history() -> None:
    histories = SessionHistories()
    event = Event(1_700_000_000, "Toy Story", labels=("genre:Comedy",))
    histories.keep("u", [event], 1)
    histories.served_by("u", "a:1")
    assert not histories.moved("u", "a:1") and histories.moved("u", "b:1")
    assert not histories.moved("new user", "b:1")
    shape = ModelShape(max_events=5, max_labels=2)
    later = Event(1_700_000_100, "Heat", labels=("genre:Action",))

    def first_op(moved: bool) -> int:
        steps = update_steps(histories, "session", "u", [later], None, shape, moved=moved)
        call = next(steps)
        op = next(t for t in call.inputs if t.name() == SESSION_OP)
        return int(np.frombuffer(op._raw_content, np.int32)[0])

    assert first_op(False) == OP_UPDATE
    assert first_op(True) == OP_START
    histories.forget("u")
    assert not histories.moved("u", "b:1")


@pytest.mark.parametrize("urls", [["a:1", "a:1"], []])
def test_urls_are_a_list_of_distinct_endpoints(urls) -> None:
    with pytest.raises(ValueError):
        EndpointPool(urls, lambda url: url)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_one_url_given_as_urls_is_named_as_given(asynchronous) -> None:
    """It said "urls must not repeat, got ['1', '2', '7', '.', ...]": its characters."""
    from dynemb_client import AsyncInterestClient, InterestClient

    client = AsyncInterestClient if asynchronous else InterestClient
    with pytest.raises(ValueError, match=r"urls must be a non-empty list of host:port, got '127"):
        client(urls="127.0.0.1:8001")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_update_many_that_fails_in_part_still_records_where_states_live(
    monkeypatch, asynchronous
) -> None:
    """A request whose rows went to b:1 and then a session failed: the others' states now
    live on b:1, so their next update must not go to a:1's older state as an update."""
    import asyncio
    from types import SimpleNamespace

    import dynemb_client.aio as aio_mod
    import dynemb_client.client as client_mod
    from dynemb_client import AsyncInterestClient, SessionUpdateError

    histories = SessionHistories()
    event = Event(1_700_000_000, "Toy Story")
    for session in ("u", "v"):
        histories.keep(session, [event], 1)
        histories.served_by(session, "a:1")
    call = SimpleNamespace(route="u", sessions=("u", "v"), retry_safe=False, model="s", batch=2)

    def steps():
        yield call
        raise SessionUpdateError({"u": None}, {"v": ServerInputError("refused")})

    async def answer(*_a, **_k):
        return "result"

    for module in (client_mod, aio_mod):
        monkeypatch.setattr(module, "parse_sessions", lambda result, model, batch: result)
    fake = SimpleNamespace(
        _pool=SimpleNamespace(route=lambda route: "b:1"),
        _infer=answer if asynchronous else (lambda *_a, **_k: "result"),
        sessions=histories,
    )
    with pytest.raises(SessionUpdateError):
        if asynchronous:
            asyncio.run(AsyncInterestClient._session(fake, steps()))
        else:
            InterestClient._session(fake, steps())
    assert not histories.moved("u", "b:1") and histories.moved("u", "a:1")


def test_a_cancelled_or_interrupted_call_is_no_longer_in_flight() -> None:
    """asyncio cancellation and Ctrl-C are not Exceptions: a call ended by either is
    released (least-outstanding balancing would avoid its endpoint for good) and does not
    mark its endpoint down."""
    import asyncio

    from dynemb_client import AsyncInterestClient
    from dynemb_client.requests import InferCall

    class Hanging:
        async def infer(self, *_a, **_k):
            await asyncio.sleep(60)

        def close(self) -> None:
            pass

    class Interrupted:
        def async_infer(self, *_a, **_k):
            raise KeyboardInterrupt

        def close(self) -> None:
            pass

    call = InferCall(model="m", inputs=[], outputs=[], batch=1)

    async def cancel_two() -> list:
        client = AsyncInterestClient(urls=URLS)
        client.grpc_module = SimpleNamespace(InferenceServerClient=lambda url: Hanging())
        task = asyncio.create_task(client._infer(call))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client._infer(call), 0.01)
        return client.endpoints()

    for endpoint in asyncio.run(cancel_two()):
        assert endpoint.outstanding == 0 and endpoint.healthy
    client = InterestClient(urls=URLS)
    client.grpc_module = SimpleNamespace(InferenceServerClient=lambda url: Interrupted())
    with pytest.raises(KeyboardInterrupt):
        client._infer(call)
    assert all(e.outstanding == 0 and e.healthy for e in client.endpoints())


def test_an_endpoint_that_answers_is_up_again_without_a_prober() -> None:
    """One URL has no prober (there is nowhere else to go): a call that succeeds after a
    transient failure shows it up again, on the channel that answered."""
    made: list[str] = []
    pool = EndpointPool(["a:1"], lambda url: made.append(url) or url)
    url, _ = pool.acquire()
    pool.release(url, unavailable())
    assert not pool.endpoints()[0].healthy
    url, _ = pool.acquire()
    pool.release(url)
    state = pool.endpoints()[0]
    assert state.healthy and state.outstanding == 0 and made == ["a:1"]


def numbered_channels() -> tuple[EndpointPool, Probe]:
    """A pool over two endpoints whose channels are named by endpoint and making order
    ("b:1#2"), probed every 10 ms by a Probe the test controls."""
    made: list[str] = []
    probe = Probe()
    pool = EndpointPool(
        ["a:1", "b:1"], lambda url: made.append(url) or f"{url}#{len(made)}", probe=probe
    )
    pool._probe_interval_s = 0.01
    return pool, probe


def test_a_replaced_channel_is_handed_back_to_close_once_no_call_is_on_it() -> None:
    """A server that comes back gets a new channel; the old one is closed as soon as the
    calls still on it end, not kept until the client closes (one per restart)."""
    pool, probe = numbered_channels()
    url, first = pool.acquire("user-1")
    _, still_on_first = pool.acquire("user-1")  # a second call on the same channel
    assert still_on_first == first
    pool.release(url, unavailable(), first)
    probe.ready.add(url)
    wait_for(lambda: {e.url: e for e in pool.endpoints()}[url].healthy)
    _, second = pool.acquire("user-1")
    assert second != first
    assert pool.closable() == []  # a call is still in flight on the old channel
    pool.release(url, client=still_on_first)
    assert pool.closable() == [first]
    assert pool.closable() == []  # handed back once
    pool.release(url, client=second)
    assert first not in pool.opened()


def test_a_channel_under_a_probe_is_not_closed_until_the_probe_ends() -> None:
    """`is_ready` probes over the pool's channel: a call that replaces that channel
    meanwhile (its server died and came back) must not hand it back to close under the
    probe."""
    pool, probe = numbered_channels()
    url, first = pool.acquire("user-1")
    pool.release(url, client=first)
    with pool.probing(url) as probed:
        assert probed == first
        _, again = pool.acquire("user-1")
        pool.release(url, unavailable(), again)  # the server dies under the probe ...
        probe.ready.add(url)
        wait_for(lambda: {e.url: e for e in pool.endpoints()}[url].healthy)  # ... is back
        _, second = pool.acquire("user-1")  # and this call replaces the probe's channel
        assert second != first
        pool.release(url, client=second)
        assert pool.closable() == []  # the probe is still on it
    assert pool.closable() == [first]
    assert first not in pool.opened()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_client_closes_a_replaced_channel_after_its_next_call(
    monkeypatch, sleeps, asynchronous
) -> None:
    import asyncio

    from dynemb_client import AsyncInterestClient

    probe = Probe()
    monkeypatch.setattr(transport_mod, "server_ready", probe)
    server = fake_server(monkeypatch)
    urls = ["a:1", "b:1"]

    async def run() -> None:
        client = (AsyncInterestClient if asynchronous else InterestClient)(
            urls=urls, probe_interval_s=0.01
        )

        async def call(fn, *args):
            result = fn(*args)
            return await result if asynchronous else result

        await call(client.model_shape)
        server.failures = [unavailable()]
        await call(client.embed, HISTORY)  # fails on one endpoint, answered by the other
        failed = server.calls[1][0]
        probe.ready.add(failed)
        wait_for(lambda: {e.url: e for e in client.endpoints()}[failed].healthy)
        for _ in range(2):  # one of them goes to `failed`, on a new channel
            await call(client.embed, HISTORY)
        assert failed in {url for url, _ in server.calls[3:]}
        assert server.closed == [failed]  # the old channel, at the end of that call
        await call(client.close)
        assert sorted(server.closed) == sorted([failed, *urls])

    asyncio.run(run())
