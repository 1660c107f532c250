"""Endpoints and retries shared by the sync and async clients.

Only the loop that waits (time.sleep vs asyncio.sleep) differs between the two clients;
which endpoint to use, what counts as transient and what the caller sees live here.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from tritonclient.utils import InferenceServerException

from dynemb_client.contract import (
    EVENT_LABELS,
    EVENT_TEXT,
    RECOMMEND,
    RETRIEVE,
    SESSION,
    SESSION_READ,
    USER_INTEREST,
    version_output,
)
from dynemb_client.errors import (
    ClientInputError,
    ServerError,
    ServerInputError,
    ServerUnavailable,
    error_message,
    is_transient,
    status_of,
)
from dynemb_client.requests import InferCall, ModelShape
from dynemb_client.sessions import (
    SessionHistories,
    check_session_id,
    refused_read_count,
    update_many_steps,
    update_steps,
    without_read_count,
)

__all__ = ["EndpointPool", "EndpointState", "RetryPolicy", "server_ready", "shape_from_metadata"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class EndpointState:
    """What the client knows of one endpoint, as `client.endpoints()` reports it."""

    url: str
    healthy: bool
    outstanding: int  # calls in flight now
    calls: int  # calls sent, all told
    failures: int  # transient failures seen (each one marks the endpoint down)
    down_s: float | None  # seconds since it was marked down; None while healthy
    last_error: str | None


@dataclass
class _Endpoint:
    url: str
    healthy: bool = True
    outstanding: int = 0
    calls: int = 0
    failures: int = 0
    down_at: float | None = None
    last_error: str | None = None
    stale: bool = False  # its channel saw the server die: open a new one on next use

    def state(self, now: float) -> EndpointState:
        down_s = None if self.down_at is None else now - self.down_at
        return EndpointState(
            self.url,
            self.healthy,
            self.outstanding,
            self.calls,
            self.failures,
            down_s,
            self.last_error,
        )


def server_ready(url: str, timeout_s: float = 1.0) -> bool:
    """One readiness probe over a channel of its own (closed again): True when tritonserver
    at `url` answers ready (strict readiness: every model loaded and ready)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        return bool(client.is_server_ready(client_timeout=timeout_s))
    except Exception:  # any failure means "not back yet"
        return False
    finally:
        client.close()


def check_url(url: object) -> str:
    """A gRPC endpoint as host:port (port 1-65535; "[::1]:8001" for IPv6), or a "unix:"
    socket path. gRPC itself took a port past 65535 modulo 65536 and a missing port as 443."""
    if isinstance(url, str) and url.startswith("unix:") and len(url) > len("unix:"):
        return url
    host, _, port = url.rpartition(":") if isinstance(url, str) else ("", "", "")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ClientInputError(
            f"expected host:port with a port in 1-65535, got {url!r}", field="url"
        )
    return url


class EndpointPool(Generic[T]):
    """Client-side balancing over server URLs, with health.

    A call goes to the healthy endpoint with the fewest calls in flight (ties in turn), or,
    when it names a route (a session), to the healthy endpoint that route hashes to
    (rendezvous hashing: only the routes of an endpoint that goes down move). A transient
    failure marks its endpoint down; a background thread probes down endpoints every
    `probe_interval_s` and brings each back once it answers ready, on a new channel (the
    old one may sit in gRPC's reconnect back-off). With every endpoint down, calls go to
    all of them in turn, so a single server behaves as before.

    The inner tritonclient objects are made on first use, so the async client builds its
    channels inside the running event loop; the probe thread only probes.
    """

    def __init__(
        self,
        urls: Sequence[str],
        factory: Callable[[str], T],
        *,
        probe: Callable[[str], bool] | None = None,  # None: server_ready
        probe_interval_s: float = 0.5,
    ) -> None:
        if isinstance(urls, str) or not urls:
            raise ValueError(f"urls must be a non-empty list of host:port, got {urls!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"urls must not repeat, got {list(urls)!r}")
        self.urls = [check_url(url) for url in urls]
        self._endpoints = {url: _Endpoint(url) for url in self.urls}
        self._factory = factory
        self._probe = probe
        self._probe_interval_s = probe_interval_s
        self._clients: dict[str, T] = {}
        # Replaced channels: each is handed back by `closable` once no call is in flight
        # on it (a server that restarts over and over must not leave one open each time).
        self._retired: list[T] = []
        self._closable: list[T] = []
        self._in_flight: dict[int, int] = {}  # id(client) -> calls on it now
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified as calls end
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None

    def acquire(self, route: str | None = None) -> tuple[str, T]:
        """The endpoint for the next call, counted in flight until `release`."""
        with self._lock:
            up = self._up()
            if route is not None:
                chosen = _owner(route, up)
            else:  # least outstanding, ties in turn
                first = next(self._turn)
                turn = [up[(first + i) % len(up)] for i in range(len(up))]
                chosen = min(turn, key=lambda e: e.outstanding)
            # Counted on its channel in this same hold of the lock: between handing a
            # channel out and counting the call, another call could replace it and have it
            # closed while unused.
            chosen.calls += 1
            inner = self._channel(chosen.url)  # no channel (it raised): nothing in flight
            chosen.outstanding += 1
            self._on(inner)
        return chosen.url, inner

    def release(
        self, url: str, failure: BaseException | None = None, client: T | None = None
    ) -> None:
        """The call on `url` (over `client`, as `acquire` gave it) ended; a transient
        `failure` marks the endpoint down."""
        with self._lock:
            endpoint = self._endpoints[url]
            endpoint.outstanding -= 1
            if client is not None:
                self._off(client)
            if failure is None and not endpoint.healthy:  # it answered: up, on this channel
                endpoint.healthy, endpoint.down_at, endpoint.stale = True, None, False
                logger.warning("endpoint %s back", url)
            if failure is None or not is_transient(failure):
                return
            endpoint.failures += 1
            endpoint.last_error = error_message(failure) or type(failure).__name__
            if endpoint.healthy:
                endpoint.healthy = False
                endpoint.down_at = time.monotonic()
                endpoint.stale = True
                logger.warning("endpoint %s down: %s", url, endpoint.last_error)
            if len(self.urls) > 1:
                self._start_prober()

    def route(self, route: str) -> str:
        """The endpoint `acquire(route)` picks now (health may change before it is used)."""
        with self._lock:
            return _owner(route, self._up()).url

    def _up(self) -> list[_Endpoint]:  # with self._lock held
        """The healthy endpoints; all of them when none is (try every one in turn)."""
        endpoints = list(self._endpoints.values())
        return [e for e in endpoints if e.healthy] or endpoints

    def healthy_besides(self, url: str) -> bool:
        """Whether another endpoint is healthy (a retry can go there at once)."""
        with self._lock:
            return any(e.healthy for u, e in self._endpoints.items() if u != url)

    def endpoints(self) -> list[EndpointState]:
        now = time.monotonic()
        with self._lock:
            return [e.state(now) for e in self._endpoints.values()]

    @contextlib.contextmanager
    def probing(self, url: str) -> Iterator[T]:
        """`url`'s client for a probe, counted in flight on its channel while the block
        runs (so that no call replacing the channel closes it under the probe); what the
        probe finds changes no health."""
        with self._lock:
            inner = self._channel(url)
            self._on(inner)
        try:
            yield inner
        finally:
            with self._lock:
                self._off(inner)

    def hold(self, client: T) -> None:
        """Count an RPC on `client` until `unhold`, however long its caller waits for it: a
        call whose caller stopped waiting (its timeout, a cancelled task, Ctrl-C) goes on
        to its end, since cancelling a call to an ensemble in flight kills tritonserver
        2.51 (dynemb.cluster.RestartBudget), and so does closing its channel under it."""
        with self._lock:
            self._on(client)

    def unhold(self, client: T) -> None:
        """The RPC `hold` counted has ended (answered or failed)."""
        with self._lock:
            self._off(client)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no call or held RPC is in flight on any channel, for at most
        `timeout_s`; True if none is."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while any(n > 0 for n in self._in_flight.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _on(self, client: T) -> None:  # with self._lock held
        """One more call on `client` (`_off` ends it)."""
        self._in_flight[id(client)] = self._in_flight.get(id(client), 0) + 1

    def _off(self, client: T) -> None:  # with self._lock held
        """One call on `client` ended: a replaced channel with none left is closable."""
        left = self._in_flight.get(id(client), 1) - 1
        self._in_flight[id(client)] = left
        self._idle.notify_all()
        if left <= 0 and any(client is old for old in self._retired):
            self._retire_now(client)

    def _channel(self, url: str) -> T:  # with self._lock held
        """`url`'s client, a new one in place of a channel that saw its server die."""
        endpoint = self._endpoints[url]
        if endpoint.stale and endpoint.healthy and url in self._clients:
            old = self._clients.pop(url)
            self._retired.append(old)
            if self._in_flight.get(id(old), 0) <= 0:
                self._retire_now(old)
            endpoint.stale = False
        if url not in self._clients:
            self._clients[url] = self._factory(url)
        return self._clients[url]

    def _retire_now(self, client: T) -> None:  # with self._lock held
        self._retired = [old for old in self._retired if old is not client]
        self._in_flight.pop(id(client), None)
        self._closable.append(client)

    def closable(self) -> list[T]:
        """Replaced clients with no call in flight, for the caller to close (once: they
        leave the pool)."""
        with self._lock:
            out, self._closable = self._closable, []
        return out

    def opened(self) -> list[T]:
        """The clients made so far (the ones to close), emptying the pool; stops probing."""
        self._stop.set()
        if self._prober is not None and self._prober is not threading.current_thread():
            self._prober.join(timeout=5)
        with self._lock:
            clients = [*self._clients.values(), *self._retired, *self._closable]
            self._clients.clear()
            self._retired.clear()
            self._closable.clear()
            self._in_flight.clear()
        return clients

    def _start_prober(self) -> None:  # with self._lock held
        if self._prober is None and not self._stop.is_set():
            self._prober = threading.Thread(
                target=self._probe_down, name="dynemb-endpoint-probe", daemon=True
            )
            self._prober.start()

    def _probe_down(self) -> None:
        while not self._stop.wait(self._probe_interval_s):
            with self._lock:
                down = [e.url for e in self._endpoints.values() if not e.healthy]
            for url in down:
                probe = self._probe or server_ready
                if self._stop.is_set() or not probe(url):
                    continue
                with self._lock:
                    endpoint = self._endpoints[url]
                    endpoint.healthy = True
                    endpoint.down_at = None
                logger.warning("endpoint %s back", url)


def _owner(route: str, endpoints: list[_Endpoint]) -> _Endpoint:
    """The endpoint a route goes to (rendezvous hashing: the highest hash of route and url
    wins, so only the routes of an endpoint that goes away move)."""
    return max(endpoints, key=lambda e: _rendezvous(route, e.url))


def _rendezvous(route: str, url: str) -> int:
    digest = hashlib.blake2b(f"{route}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def deadline_exceeded(timeout_s: float) -> InferenceServerException:
    """The error of a call not answered within the client's timeout: a gRPC deadline's
    status, though no deadline is sent (the call is left to finish: `EndpointPool.hold`)."""
    return InferenceServerException(
        f"Deadline Exceeded: no answer in {timeout_s:g} s (the call is left to finish)",
        status="StatusCode.DEADLINE_EXCEEDED",
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Transient failures (`is_transient`) are retried, after an exponentially growing
    back-off with jitter (each wait is drawn from [b/2, b], b doubling from `backoff_s` up
    to `max_backoff_s`), until `deadline_s` has passed since the first attempt, or after
    `retries` retries when that is set (0: never retry); anything else surfaces at once.

    The default deadline outlasts a restart of one server as measured here (start-up and
    shutdown together, benchmarks/results/faults.md), so a caller rides through one."""

    deadline_s: float = 30.0
    retries: int | None = None
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.deadline_s < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("deadline_s, backoff_s and max_backoff_s must be >= 0")
        if self.retries is not None and self.retries < 0:
            raise ValueError("retries must be >= 0 (or None: the deadline alone)")

    def delay(self, attempt: int) -> float:
        cap = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return random.uniform(cap / 2, cap) if self.jitter else cap

    def after_failure(
        self,
        exc: Exception,
        attempt: int,
        *,
        model: str,
        url: str,
        elapsed_s: float = 0.0,
        elsewhere: bool = False,
    ) -> float:
        """Seconds to wait before attempt `attempt + 1`, or raise what the caller should see.
        `elsewhere`: another endpoint is healthy, so the retry goes there without waiting."""
        status = status_of(exc)
        message = error_message(exc)
        if not is_transient(exc):
            if status == "INVALID_ARGUMENT":
                raise ServerInputError(message, model=model, status=status, url=url) from exc
            if isinstance(exc, InferenceServerException):
                raise ServerError(message or str(exc), model=model, status=status, url=url) from exc
            raise exc
        delay = 0.0 if elsewhere else self.delay(attempt)
        out_of_retries = self.retries is not None and attempt >= self.retries
        if out_of_retries or elapsed_s + delay > self.deadline_s:
            raise ServerUnavailable(
                f"no server answered in {elapsed_s:.1f} s and {attempt + 1} attempts "
                f"(last {url}: {message})",
                model=model,
                status=status,
                url=url,
            ) from exc
        logger.warning(
            "%s at %s unavailable (%s); retry %d in %.2fs (%.1f s of %.0f s spent)",
            model,
            url,
            message,
            attempt + 1,
            delay,
            elapsed_s,
            self.deadline_s,
        )
        return delay


def shape_from_metadata(metadata: Mapping[str, Any], model: str) -> ModelShape:
    """L and M from the model metadata (EVENT_TEXT is [-1, L], EVENT_LABELS [-1, L, M])."""
    shapes = {
        tensor["name"]: [int(dim) for dim in tensor["shape"]]
        for tensor in metadata.get("inputs", [])
    }
    try:
        text, labels = shapes[EVENT_TEXT], shapes[EVENT_LABELS]
    except KeyError as exc:
        raise ServerError(f"model metadata has no input {exc.args[0]}", model=model) from None
    max_events, max_labels = text[-1], labels[-1]
    if len(labels) < 2 or labels[-2] != max_events or max_events < 1 or max_labels < 1:
        raise ServerError(
            f"unexpected input shapes {EVENT_TEXT}={text}, {EVENT_LABELS}={labels}", model=model
        )
    logger.debug("%s serves L=%d events, M=%d labels", model, max_events, max_labels)
    return ModelShape(max_events=max_events, max_labels=max_labels)


def with_session_outputs(shape: ModelShape, metadata: Mapping[str, Any]) -> ModelShape:
    """`shape` with what the session model's metadata says it answers (SESSION_READ)."""
    outputs = {tensor["name"] for tensor in metadata.get("outputs", [])}
    return replace(shape, session_read=SESSION_READ in outputs)


def reported_stages(metadata: Mapping[str, Any], stages: Sequence[str]) -> tuple[str, ...]:
    """The stages among `stages` whose version the model's answers carry, from its metadata:
    every stage's in a Python-backend repository; fewer in one whose stages are native
    models (NVIDIA's container variant) or that was built before answers carried versions.
    A versioned call asks for these only (Triton refuses an output a model lacks)."""
    outputs = {tensor["name"] for tensor in metadata.get("outputs", [])}
    return tuple(stage for stage in stages if version_output(stage) in outputs)


class ClientBase:
    """Endpoints, retry policy and model names, shared by the sync and asyncio clients.

    Subclasses set `grpc_module` to `tritonclient.grpc` or `tritonclient.grpc.aio`.
    """

    grpc_module: Any

    def __init__(
        self,
        url: str = "127.0.0.1:8001",
        *,
        urls: Sequence[str] | None = None,
        probe_interval_s: float = 0.5,
        timeout_s: float = 10.0,
        retry_deadline_s: float = RetryPolicy.deadline_s,
        retries: int | None = None,
        backoff_s: float = RetryPolicy.backoff_s,
        jitter: bool = True,
        model_interest: str = USER_INTEREST,
        model_recommend: str = RECOMMEND,
        model_session: str = SESSION,
        model_retrieve: str = RETRIEVE,
        max_sessions: int = 100_000,
    ) -> None:
        self._pool = EndpointPool(
            # A string is refused there as one (as a list, its characters were "urls").
            [url] if urls is None else urls if isinstance(urls, str) else list(urls),
            lambda u: self.grpc_module.InferenceServerClient(url=u),
            probe_interval_s=probe_interval_s,
        )
        self._retry = RetryPolicy(
            deadline_s=retry_deadline_s, retries=retries, backoff_s=backoff_s, jitter=jitter
        )
        self._timeout_s = timeout_s
        self.model_interest = model_interest
        self.model_recommend = model_recommend
        self.model_session = model_session
        self.model_retrieve = model_retrieve
        # The newest L events of each session, re-sent when a server lost its state.
        self.sessions = SessionHistories(max_sessions)
        self._shape: ModelShape | None = None
        self._session_shape: ModelShape | None = None  # with the session model's outputs
        self._read_count_refused = False  # an endpoint's session model lacks SESSION_READ
        self._reporting: dict[str, tuple[str, ...]] = {}  # model -> stages it reports
        # The asyncio client's calls in flight, as tasks by id: the event loop holds tasks
        # only weakly, and a task collected mid-call would cancel it.
        self._rpcs: dict[int, Any] = {}

    def _session_shape_asked(self, fetched: ModelShape) -> ModelShape:
        """The session model's shape as fetched (`session_shape`), less SESSION_READ once
        an endpoint refused it: in a rolling upgrade the endpoints may serve two builds,
        and the client then checks lengths only."""
        return replace(fetched, session_read=False) if self._read_count_refused else fetched

    def _without_refused_output(self, exc: Exception, call: InferCall) -> InferCall | None:
        """`call` again without SESSION_READ if an endpoint of an older build refused it
        for asking the output (not applied, so safe to send again); no later call asks
        for it. None for any other failure."""
        if not refused_read_count(exc, call):
            return None
        self._read_count_refused = True
        return without_read_count(call)

    @property
    def urls(self) -> list[str]:
        return list(self._pool.urls)

    @property
    def _drain_s(self) -> float:
        """How long `close` waits for the calls left to finish: as long as a call may take."""
        return max(self._timeout_s, self._retry.deadline_s)

    def endpoints(self) -> list[EndpointState]:
        """Each endpoint's health and counts, in the order given."""
        return self._pool.endpoints()

    def _failed(
        self,
        exc: Exception,
        url: str,
        attempt: int,
        model: str,
        started: float,
        retry: bool,
        inner: Any = None,
    ) -> float:
        """After attempt `attempt` at `url` raised `exc` (call it in the except block): the
        endpoint released (marked down if the failure was transient), and the delay before
        the next attempt, 0 when another endpoint is healthy. Re-raises what is not
        retried: bad input, an exhausted deadline, and with `retry=False` a transient
        failure (the caller decides what is safe to send instead)."""
        self._pool.release(url, exc, inner)
        if not retry and is_transient(exc):
            raise exc
        return self._retry.after_failure(
            exc,
            attempt,
            model=model,
            url=url,
            elapsed_s=time.monotonic() - started,
            elsewhere=self._pool.healthy_besides(url),
        )

    def _update_many_steps(self, updates, at, shape: ModelShape):
        """The steps of several sessions' updates, grouped by the endpoint of each."""
        if not isinstance(updates, Mapping):
            raise TypeError(f"updates maps session ids to new events, not {type(updates).__name__}")
        return update_many_steps(
            self.sessions, self.model_session, updates, at, shape, self._pool.route
        )

    def _update_steps(self, user_id, events, at, shape: ModelShape, history):
        """The steps of one session update, started from scratch when the session's
        endpoint changed since its last call (SessionHistories.moved)."""
        user_id = check_session_id(user_id)  # before routing, which hashes its UTF-8
        moved = self.sessions.moved(user_id, self._pool.route(user_id))
        return update_steps(
            self.sessions, self.model_session, user_id, events, at, shape, history, moved
        )
