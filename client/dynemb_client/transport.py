"""Endpoints and retries shared by the sync and async clients.

Only the loop that waits (time.sleep vs asyncio.sleep) differs between the two clients;
which endpoint to use, what counts as transient and what the caller sees live here.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tritonclient.utils import InferenceServerException

from dynemb_client.contract import (
    EVENT_LABELS,
    EVENT_TEXT,
    RECOMMEND,
    RETRIEVE,
    SESSION,
    USER_INTEREST,
)
from dynemb_client.errors import ServerError, ServerInputError, ServerUnavailable
from dynemb_client.requests import ModelShape
from dynemb_client.sessions import SessionHistories

__all__ = ["EndpointPool", "RetryPolicy", "shape_from_metadata"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# gRPC statuses that mean "no server took the request": safe and useful to retry elsewhere.
_RETRYABLE_STATUSES = frozenset({"UNAVAILABLE"})
_STUB_DOWN = "is not healthy"
_RELOADING = "has no available versions"


class EndpointPool(Generic[T]):
    """Round-robin over server URLs; the inner tritonclient objects are made on first use.

    Lazy creation lets the async client build its channels inside the running event loop.
    """

    def __init__(self, urls: Sequence[str], factory: Callable[[str], T]) -> None:
        if isinstance(urls, str) or not urls:
            raise ValueError(f"urls must be a non-empty list of host:port, got {urls!r}")
        self.urls = list(urls)
        self._factory = factory
        self._clients: dict[str, T] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def next(self) -> tuple[str, T]:
        """The next endpoint in turn (a retry moves on, so a dead server is skipped)."""
        url = self.urls[next(self._turn) % len(self.urls)]
        return url, self.client(url)

    def client(self, url: str) -> T:
        with self._lock:
            if url not in self._clients:
                self._clients[url] = self._factory(url)
            return self._clients[url]

    def opened(self) -> list[T]:
        """The clients made so far (the ones to close), emptying the pool."""
        with self._lock:
            clients = list(self._clients.values())
            self._clients.clear()
        return clients


def status_of(exc: BaseException) -> str | None:
    """ "StatusCode.UNAVAILABLE" -> "UNAVAILABLE"; None when the error carries no status."""
    if isinstance(exc, InferenceServerException) and exc.status():
        return str(exc.status()).removeprefix("StatusCode.")
    return None


def is_transient(exc: BaseException) -> bool:
    """No server could judge the request, so sending it again (here or elsewhere) is safe:
    a connection-level failure, UNAVAILABLE, or one of the two answers tritonserver 2.51
    gives while a stage is down and being reloaded (dynemb.supervisor): INTERNAL "Stub
    process ... is not healthy" before the reload, NOT_FOUND "... has no available
    versions" during it (a model that does not exist at all says "is not found")."""
    if isinstance(exc, ConnectionError):
        return True
    status = status_of(exc)
    message = _message(exc) or ""
    if status in _RETRYABLE_STATUSES:
        return True
    return (status == "INTERNAL" and _STUB_DOWN in message) or (
        status == "NOT_FOUND" and _RELOADING in message
    )


def _message(exc: BaseException) -> str:
    return exc.message() if isinstance(exc, InferenceServerException) else str(exc)


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
        self, exc: Exception, attempt: int, *, model: str, url: str, elapsed_s: float = 0.0
    ) -> float:
        """Seconds to wait before attempt `attempt + 1`, or raise what the caller should see."""
        status = status_of(exc)
        message = _message(exc)
        if not is_transient(exc):
            if status == "INVALID_ARGUMENT":
                raise ServerInputError(message, model=model, status=status, url=url) from exc
            if isinstance(exc, InferenceServerException):
                raise ServerError(message or str(exc), model=model, status=status, url=url) from exc
            raise exc
        delay = self.delay(attempt)
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
            list(urls) if urls is not None else [url],
            lambda u: self.grpc_module.InferenceServerClient(url=u),
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

    @property
    def urls(self) -> list[str]:
        return list(self._pool.urls)
