"""Blocking gRPC client for the `user_interest` and `recommend` ensembles."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dynemb_client.contract import INTEREST_STAGES, RECOMMEND_STAGES
from dynemb_client.events import Event, TimeLike
from dynemb_client.requests import (
    InferCall,
    ModelShape,
    embedding_call,
    recommend_call,
    versions_asked,
)
from dynemb_client.results import (
    Recommendation,
    Versioned,
    parse_embeddings,
    parse_recommendations,
    with_versions,
)
from dynemb_client.sessions import (
    SessionAnswer,
    forget_steps,
    interrupted,
    parse_sessions,
    retrieve_call,
)
from dynemb_client.transport import (
    ClientBase,
    deadline_exceeded,
    reported_stages,
    shape_from_metadata,
    with_session_outputs,
)

__all__ = ["InterestClient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
QueryTimes = TimeLike | Sequence[TimeLike | None] | None


class InterestClient(ClientBase):
    """Embeds users and recommends items over gRPC, with retries and several endpoints.

    L (events) and M (labels per event) are read once from the server's metadata of
    `model_interest`, so the client follows whatever the server was built with.
    """

    grpc_module = grpcclient

    def _call(
        self,
        model: str,
        fn: Callable[[grpcclient.InferenceServerClient], T],
        retry: bool = True,
        route: str | None = None,
    ) -> T:
        started = time.monotonic()
        for attempt in itertools.count():
            url, inner = self._pool.acquire(route)
            try:
                result = fn(inner)
            except Exception as exc:
                delay = self._failed(exc, url, attempt, model, started, retry, inner)
            except BaseException:  # cancelled, Ctrl-C: not in flight, and not the server's fault
                self._pool.release(url, client=inner)
                raise
            else:
                self._pool.release(url, client=inner)
                self._close_replaced()
                return result
            self._close_replaced()
            if delay:
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _infer(self, call: InferCall, retry: bool = True) -> grpcclient.InferResult:
        return self._call(call.model, lambda inner: self._sent(inner, call), retry, call.route)

    def _sent(self, inner: grpcclient.InferenceServerClient, call: InferCall):
        """One attempt of `call`: its answer within the timeout, else DEADLINE_EXCEEDED. No
        gRPC deadline goes with it, and a caller that stops waiting (the timeout, Ctrl-C,
        a killed greenlet) leaves it to finish (EndpointPool.hold): tritonserver 2.51 dies
        when an ensemble call is cancelled in flight."""
        answered = threading.Event()
        outcome: list[tuple[grpcclient.InferResult | None, Exception | None]] = []

        def finished(result, error) -> None:  # on a gRPC thread
            outcome.append((result, error))
            self._pool.unhold(inner)
            answered.set()

        self._pool.hold(inner)
        try:
            inner.async_infer(call.model, call.inputs, finished, outputs=call.outputs)
        except BaseException:
            self._pool.unhold(inner)
            raise
        if not answered.wait(self._timeout_s):
            raise deadline_exceeded(self._timeout_s)
        result, error = outcome[0]
        if error is not None:
            raise error
        return result

    def model_shape(self) -> ModelShape:
        """L and M of the served model, fetched on first use."""
        if self._shape is None:
            metadata = self._call(
                self.model_interest,
                lambda inner: inner.get_model_metadata(
                    self.model_interest, as_json=True, client_timeout=self._timeout_s
                ),
            )
            self._shape = shape_from_metadata(metadata, self.model_interest)
        return self._shape

    def session_shape(self) -> ModelShape:
        """`model_shape`, with whether the session model answers SESSION_READ (fetched
        on first use; see `_session_shape_asked`)."""
        if self._session_shape is None:
            shape = self.model_shape()
            metadata = self._call(
                self.model_session,
                lambda inner: inner.get_model_metadata(
                    self.model_session, as_json=True, client_timeout=self._timeout_s
                ),
            )
            self._session_shape = with_session_outputs(shape, metadata)
        return self._session_shape_asked(self._session_shape)

    def reported(self, model: str, stages: Sequence[str]) -> tuple[str, ...]:
        """The stages among `stages` whose versions `model` reports, fetched on first use."""
        if model not in self._reporting:
            metadata = self._call(
                model,
                lambda inner: inner.get_model_metadata(
                    model, as_json=True, client_timeout=self._timeout_s
                ),
            )
            self._reporting[model] = reported_stages(metadata, stages)
        return self._reporting[model]

    def embed(self, events: Sequence[Event], at: TimeLike | None = None) -> np.ndarray:
        """E_t for one user: float32 (D,)."""
        return self.embed_many([events], at=[at])[0]

    def embed_many(self, histories: Sequence[Sequence[Event]], at: QueryTimes = None) -> np.ndarray:
        """E_t for many users in one request: float32 (N, D)."""
        call = embedding_call(self.model_interest, histories, at, self.model_shape())
        return parse_embeddings(self._infer(call), call.model, call.batch)

    def prepare_embed(
        self, histories: Sequence[Sequence[Event]], at: QueryTimes = None
    ) -> InferCall:
        """The request `embed_many` sends, built (and validated) once: a caller that sends
        the same users again and again (a load test) pays for building it only once."""
        return embedding_call(self.model_interest, histories, at, self.model_shape())

    def embed_prepared(self, call: InferCall) -> np.ndarray:
        """E_t for a request from `prepare_embed`: float32 (N, D)."""
        return parse_embeddings(self._infer(call), call.model, call.batch)

    def recommend(
        self,
        events: Sequence[Event],
        k: int = 10,
        at: TimeLike | None = None,
        exclude: Iterable[str] | None = (),
    ) -> list[Recommendation]:
        """Up to k items for one user, best first, none of them in `exclude` (item ids)."""
        return self.recommend_many([events], k=k, at=[at], exclude=[exclude])[0]

    def recommend_many(
        self,
        histories: Sequence[Sequence[Event]],
        k: int = 10,
        at: QueryTimes = None,
        exclude: Sequence[Iterable[str]] | None = None,
    ) -> list[list[Recommendation]]:
        """Up to k items for each of many users, in one request; `exclude` gives per user
        the item ids to leave out (e.g. those already in the history)."""
        call = recommend_call(self.model_recommend, histories, at, self.model_shape(), k, exclude)
        return parse_recommendations(self._infer(call), call.model, call.batch, k, call.exclude)

    def embed_many_versioned(
        self, histories: Sequence[Sequence[Event]], at: QueryTimes = None
    ) -> Versioned[np.ndarray]:
        """`embed_many` and the version of each stage that computed the embeddings (of
        each that reports one: a native model in NVIDIA's container cannot)."""
        call = versions_asked(
            embedding_call(self.model_interest, histories, at, self.model_shape()),
            self.reported(self.model_interest, INTEREST_STAGES),
        )
        result = self._infer(call)
        return with_versions(result, call, parse_embeddings(result, call.model, call.batch))

    def recommend_many_versioned(
        self,
        histories: Sequence[Sequence[Event]],
        k: int = 10,
        at: QueryTimes = None,
        exclude: Sequence[Iterable[str]] | None = None,
    ) -> Versioned[list[list[Recommendation]]]:
        """`recommend_many` and the version of each stage that computed the lists (of
        each that reports one)."""
        shape = self.model_shape()
        call = versions_asked(
            recommend_call(self.model_recommend, histories, at, shape, k, exclude),
            self.reported(self.model_recommend, RECOMMEND_STAGES),
        )
        result = self._infer(call)
        items = parse_recommendations(result, call.model, call.batch, k, call.exclude)
        return with_versions(result, call, items)

    # --- sessions: E_t advanced event by event (server-side state per user) -------------

    def update(
        self,
        user_id: str,
        events: Sequence[Event] = (),
        at: TimeLike | None = None,
        history: Sequence[Event] | None = None,
    ) -> np.ndarray:
        """E_t after the user's new `events` (float32 (D,)): the server advances the state it
        holds for `user_id` by them alone. Where it holds none (a new user, or one evicted,
        expired, restarted or swapped away), the client re-sends the newest L events it
        kept for the user (or `history`, the caller's, when given) with the new ones: the
        answer is the same, only slower. `at` defaults to the newest event's time."""
        return self._session(
            self._update_steps(user_id, events, at, self.session_shape(), history)
        ).embedding

    def update_many(
        self, updates: Mapping[str, Sequence[Event]], at: TimeLike | None = None
    ) -> dict[str, np.ndarray]:
        """E_t of each session after its new events (user id -> events), in one `session`
        request per endpoint of up to 32 sessions, as a stream consumer would send a batch
        of events. Each answer equals `update(user_id, events, at)`'s; a session the server
        lost is started again as `update` does. If some sessions' events are refused as bad
        input, every other session is still updated and SessionUpdateError says which
        (with the others' E_t); if a request fails otherwise, PartialUpdateError likewise
        (send the failed sessions' events again: they start from their kept windows). `at`
        defaults to each session's newest event."""
        if isinstance(updates, Mapping) and not updates:
            return {}  # nothing to send, with or without a server
        answers = self._session(self._update_many_steps(updates, at, self.session_shape()))
        return {session: answer.embedding for session, answer in answers.items()}

    def embed_user(self, user_id: str, at: TimeLike | None = None) -> np.ndarray:
        """E_t of the session at `at` (default: its newest event's time), no new events."""
        return self.update(user_id, (), at)

    def recommend_user(
        self,
        user_id: str,
        k: int = 10,
        at: TimeLike | None = None,
        exclude: Iterable[str] | None = (),
    ) -> list[Recommendation]:
        """Up to k items for the session's E_t, best first, none of them in `exclude`."""
        embedding = self.embed_user(user_id, at)
        call = retrieve_call(self.model_retrieve, embedding, k, exclude)
        return parse_recommendations(self._infer(call), call.model, 1, k, call.exclude)[0]

    def forget(self, user_id: str) -> None:
        """Drop the session here and on the server."""
        shape = self.session_shape()
        self._session(forget_steps(self.sessions, self.model_session, user_id, shape))

    def _session(self, steps) -> SessionAnswer:
        written: dict[str, str] = {}  # session -> the endpoint that holds its state
        try:
            call = next(steps)  # steps with nothing to send (no updates) stop at once
            while True:
                try:
                    url = self._pool.route(call.route) if call.route is not None else None
                    result = self._infer(call, retry=call.retry_safe)
                    answers = parse_sessions(result, call.model, call.batch)
                except Exception as exc:
                    # sent again without an output an older build lacks; else the steps
                    # choose what is safe to send next
                    again = self._without_refused_output(exc, call)
                    call = steps.throw(exc) if again is None else again
                    continue
                except BaseException as exc:  # Ctrl-C, a cancelled task
                    interrupted(steps, exc)
                if url is not None:
                    written.update(dict.fromkeys(call.sessions, url))
                call = steps.send(answers)
        except StopIteration as done:
            return done.value
        finally:  # also when some sessions failed: the others' states live there now
            for session, held_by in written.items():
                self.sessions.served_by(session, held_by)

    def is_ready(self) -> bool:
        """True when every endpoint is up and serves `model_interest` (no retries: a probe)."""
        for url in self._pool.urls:
            with self._pool.probing(url) as inner:
                try:
                    ready = inner.is_server_ready(client_timeout=self._timeout_s) and (
                        inner.is_model_ready(self.model_interest, client_timeout=self._timeout_s)
                    )
                except (InferenceServerException, ConnectionError) as exc:
                    logger.debug("%s not ready: %s", url, exc)
                    ready = False
            self._close_replaced()
            if not ready:
                return False
        return True

    def close(self) -> None:
        """Close the channels, once the calls left to finish have (for as long as a call
        may retry): closing a channel cancels its calls in flight (see `_sent`)."""
        self._pool.wait_idle(self._drain_s)
        for inner in self._pool.opened():
            inner.close()

    def _close_replaced(self) -> None:
        """Close the channels replaced after their server came back, once idle."""
        for inner in self._pool.closable():
            inner.close()

    def __enter__(self) -> InterestClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
