"""asyncio gRPC client: the same API as InterestClient, as coroutines."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from dynemb_client.client import QueryTimes
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

__all__ = ["AsyncInterestClient"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class AsyncInterestClient(ClientBase):
    """Embeds users and recommends items over asyncio gRPC (see InterestClient).

    Channels are opened on first use, inside the running event loop, and belong to it: a
    client serves one event loop (for another `asyncio.run`, make another client).
    """

    grpc_module = grpcclient
    _loop: asyncio.AbstractEventLoop | None = None  # the loop of the first call

    async def _call(
        self,
        model: str,
        fn: Callable[[grpcclient.InferenceServerClient], Awaitable[T]],
        retry: bool = True,
        route: str | None = None,
    ) -> T:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:  # its channels would fail with "Event loop is closed"
            raise RuntimeError(
                "this AsyncInterestClient was first used in another event loop, which its "
                "channels belong to: make a new client for this one"
            )
        started = time.monotonic()
        for attempt in itertools.count():
            url, inner = self._pool.acquire(route)
            try:
                result = await fn(inner)
            except Exception as exc:
                delay = self._failed(exc, url, attempt, model, started, retry, inner)
            except BaseException:  # cancelled, Ctrl-C: not in flight, and not the server's fault
                self._pool.release(url, client=inner)
                raise
            else:
                self._pool.release(url, client=inner)
                await self._close_replaced()
                return result
            await self._close_replaced()
            if delay:
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _infer(self, call: InferCall, retry: bool = True) -> grpcclient.InferResult:
        return await self._call(
            call.model, lambda inner: self._sent(inner, call), retry, call.route
        )

    async def _sent(
        self, inner: grpcclient.InferenceServerClient, call: InferCall
    ) -> grpcclient.InferResult:
        """One attempt of `call`: its answer within the timeout, else DEADLINE_EXCEEDED. No
        gRPC deadline goes with it, and a caller that stops waiting (the timeout, a
        cancelled task) leaves it to finish in a task of its own (EndpointPool.hold):
        tritonserver 2.51 dies when an ensemble call is cancelled in flight."""
        self._pool.hold(inner)
        rpc = asyncio.ensure_future(inner.infer(call.model, call.inputs, outputs=call.outputs))
        self._rpcs[id(rpc)] = rpc

        def finished(task: asyncio.Future) -> None:
            self._rpcs.pop(id(task), None)
            self._pool.unhold(inner)
            if not task.cancelled():
                task.exception()  # seen: the caller may be gone, and is told otherwise

        rpc.add_done_callback(finished)
        try:
            return await asyncio.wait_for(asyncio.shield(rpc), self._timeout_s)
        except TimeoutError:
            raise deadline_exceeded(self._timeout_s) from None

    async def model_shape(self) -> ModelShape:
        """L and M of the served model, fetched on first use (a concurrent refetch is harmless)."""
        if self._shape is None:
            metadata = await self._call(
                self.model_interest,
                lambda inner: inner.get_model_metadata(
                    self.model_interest, as_json=True, client_timeout=self._timeout_s
                ),
            )
            self._shape = shape_from_metadata(metadata, self.model_interest)
        return self._shape

    async def session_shape(self) -> ModelShape:
        """`model_shape`, with whether the session model answers SESSION_READ (fetched
        on first use; see `_session_shape_asked`)."""
        if self._session_shape is None:
            shape = await self.model_shape()
            metadata = await self._call(
                self.model_session,
                lambda inner: inner.get_model_metadata(
                    self.model_session, as_json=True, client_timeout=self._timeout_s
                ),
            )
            self._session_shape = with_session_outputs(shape, metadata)
        return self._session_shape_asked(self._session_shape)

    async def reported(self, model: str, stages: Sequence[str]) -> tuple[str, ...]:
        """The stages among `stages` whose versions `model` reports, fetched on first use."""
        if model not in self._reporting:
            metadata = await self._call(
                model,
                lambda inner: inner.get_model_metadata(
                    model, as_json=True, client_timeout=self._timeout_s
                ),
            )
            self._reporting[model] = reported_stages(metadata, stages)
        return self._reporting[model]

    async def embed(self, events: Sequence[Event], at: TimeLike | None = None) -> np.ndarray:
        """E_t for one user: float32 (D,)."""
        return (await self.embed_many([events], at=[at]))[0]

    async def embed_many(
        self, histories: Sequence[Sequence[Event]], at: QueryTimes = None
    ) -> np.ndarray:
        """E_t for many users in one request: float32 (N, D)."""
        call = embedding_call(self.model_interest, histories, at, await self.model_shape())
        return parse_embeddings(await self._infer(call), call.model, call.batch)

    async def prepare_embed(
        self, histories: Sequence[Sequence[Event]], at: QueryTimes = None
    ) -> InferCall:
        """The request `embed_many` sends, built (and validated) once (see InterestClient)."""
        return embedding_call(self.model_interest, histories, at, await self.model_shape())

    async def embed_prepared(self, call: InferCall) -> np.ndarray:
        """E_t for a request from `prepare_embed`: float32 (N, D)."""
        return parse_embeddings(await self._infer(call), call.model, call.batch)

    async def recommend(
        self,
        events: Sequence[Event],
        k: int = 10,
        at: TimeLike | None = None,
        exclude: Iterable[str] | None = (),
    ) -> list[Recommendation]:
        """Up to k items for one user, best first, none of them in `exclude` (item ids)."""
        return (await self.recommend_many([events], k=k, at=[at], exclude=[exclude]))[0]

    async def recommend_many(
        self,
        histories: Sequence[Sequence[Event]],
        k: int = 10,
        at: QueryTimes = None,
        exclude: Sequence[Iterable[str]] | None = None,
    ) -> list[list[Recommendation]]:
        """Up to k items for each of many users, in one request; `exclude` gives per user
        the item ids to leave out (e.g. those already in the history)."""
        call = recommend_call(
            self.model_recommend, histories, at, await self.model_shape(), k, exclude
        )
        return parse_recommendations(
            await self._infer(call), call.model, call.batch, k, call.exclude
        )

    async def embed_many_versioned(
        self, histories: Sequence[Sequence[Event]], at: QueryTimes = None
    ) -> Versioned[np.ndarray]:
        """`embed_many` and the version of each stage that computed the embeddings (of
        each that reports one: a native model in NVIDIA's container cannot)."""
        call = versions_asked(
            embedding_call(self.model_interest, histories, at, await self.model_shape()),
            await self.reported(self.model_interest, INTEREST_STAGES),
        )
        result = await self._infer(call)
        return with_versions(result, call, parse_embeddings(result, call.model, call.batch))

    async def recommend_many_versioned(
        self,
        histories: Sequence[Sequence[Event]],
        k: int = 10,
        at: QueryTimes = None,
        exclude: Sequence[Iterable[str]] | None = None,
    ) -> Versioned[list[list[Recommendation]]]:
        """`recommend_many` and the version of each stage that computed the lists (of
        each that reports one)."""
        shape = await self.model_shape()
        call = versions_asked(
            recommend_call(self.model_recommend, histories, at, shape, k, exclude),
            await self.reported(self.model_recommend, RECOMMEND_STAGES),
        )
        result = await self._infer(call)
        items = parse_recommendations(result, call.model, call.batch, k, call.exclude)
        return with_versions(result, call, items)

    # --- sessions (see InterestClient.update) --------------------------------------------

    async def update(
        self,
        user_id: str,
        events: Sequence[Event] = (),
        at: TimeLike | None = None,
        history: Sequence[Event] | None = None,
    ) -> np.ndarray:
        """E_t after the user's new `events`, from the server's state for `user_id`."""
        shape = await self.session_shape()
        steps = self._update_steps(user_id, events, at, shape, history)
        return (await self._session(steps)).embedding

    async def update_many(
        self, updates: Mapping[str, Sequence[Event]], at: TimeLike | None = None
    ) -> dict[str, np.ndarray]:
        """E_t of each session after its new events (see InterestClient.update_many)."""
        if isinstance(updates, Mapping) and not updates:
            return {}  # nothing to send, with or without a server
        shape = await self.session_shape()
        answers = await self._session(self._update_many_steps(updates, at, shape))
        return {session: answer.embedding for session, answer in answers.items()}

    async def embed_user(self, user_id: str, at: TimeLike | None = None) -> np.ndarray:
        return await self.update(user_id, (), at)

    async def recommend_user(
        self,
        user_id: str,
        k: int = 10,
        at: TimeLike | None = None,
        exclude: Iterable[str] | None = (),
    ) -> list[Recommendation]:
        embedding = await self.embed_user(user_id, at)
        call = retrieve_call(self.model_retrieve, embedding, k, exclude)
        return parse_recommendations(await self._infer(call), call.model, 1, k, call.exclude)[0]

    async def forget(self, user_id: str) -> None:
        shape = await self.session_shape()
        await self._session(forget_steps(self.sessions, self.model_session, user_id, shape))

    async def _session(self, steps) -> SessionAnswer:
        written: dict[str, str] = {}  # session -> the endpoint that holds its state
        try:
            call = next(steps)  # steps with nothing to send (no updates) stop at once
            while True:
                try:
                    url = self._pool.route(call.route) if call.route is not None else None
                    result = await self._infer(call, retry=call.retry_safe)
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

    async def is_ready(self) -> bool:
        """True when every endpoint is up and serves `model_interest` (no retries: a probe)."""
        for url in self._pool.urls:
            with self._pool.probing(url) as inner:
                try:
                    ready = await inner.is_server_ready(client_timeout=self._timeout_s) and (
                        await inner.is_model_ready(
                            self.model_interest, client_timeout=self._timeout_s
                        )
                    )
                except (InferenceServerException, ConnectionError) as exc:
                    logger.debug("%s not ready: %s", url, exc)
                    ready = False
            await self._close_replaced()
            if not ready:
                return False
        return True

    async def close(self) -> None:
        """Close the channels, once the calls left to finish have (for as long as a call
        may retry): closing a channel cancels its calls in flight (see `_sent`)."""
        if self._rpcs:
            await asyncio.wait(list(self._rpcs.values()), timeout=self._drain_s)
        # Off the event loop: stopping the pool joins its prober thread (up to a probe).
        for inner in await asyncio.to_thread(self._pool.opened):
            await inner.close()

    async def _close_replaced(self) -> None:
        """Close the channels replaced after their server came back, once idle."""
        for inner in self._pool.closable():
            await inner.close()

    async def __aenter__(self) -> AsyncInterestClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
