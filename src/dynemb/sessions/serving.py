"""The Triton model `session`: a store of per-user states and the engine that advances
them, over the stage versions the server serves.

One instance holds every state (a user's next update must find it; Triton has no
implicit state for the Python backend, and the sequence batcher's slots suit short
sequences, not a population of users). Before each batch it asks the server which version
of every session stage is loaded and ready; when one changed (a swap), it loads the new
versions and drops every state: a state is never advanced by versions other than those
that computed it, so a response never mixes two versions of a stage. A session the store
does not hold (never seen, evicted, expired, dropped, or the server restarted) is answered
STATUS_UNKNOWN, and the client sends the history it keeps (dynemb_client.sessions).

Like dynemb.serving.adapter, nothing here imports Triton: `model.py` hands in pb_utils.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from dynemb.errors import InputError
from dynemb.manifest import MANIFEST
from dynemb.pipeline import versions_of
from dynemb.serving.adapter import NonFiniteOutputError, read_inputs
from dynemb.serving.arrays import all_finite
from dynemb.serving.byte_tensors import use_fast_bytes
from dynemb.serving.metrics import CounterIncreases, Publisher
from dynemb.sessions.engine import SESSION_STAGES, Advanced, SessionEngine
from dynemb.sessions.spec import EVENT_TENSORS, SessionOptions, session_spec
from dynemb.sessions.state import SessionState, StateStore, StoreStats, Versions
from dynemb.specs import StageSpec
from dynemb_client import contract as wire


class NoServingVersionError(RuntimeError):
    """A session stage has no version loaded and ready (the server is starting, or the
    stage is down): the request is UNAVAILABLE, for the client to retry."""


class RowAnswer(NamedTuple):
    """One row's answer: E_t (zeros unless OK), its status, the events its window holds
    and the events the session has read since it started (0 unless OK)."""

    embedding: np.ndarray
    status: int
    held: int
    read: int


@dataclass
class _Row:
    request: int
    session: str
    op: int
    inputs: dict[str, np.ndarray]


class SessionAdapter:
    """Subclassed by the `session` model's `model.py` with pb_utils set."""

    pb_utils: ModuleType

    def initialize(self, args: dict[str, str]) -> None:
        use_fast_bytes(self.pb_utils)
        self.repository = Path(args["model_repository"]).parent
        config = json.loads(args.get("model_config") or "{}")
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.options = SessionOptions.from_parameters(parameters)
        # A repository built before answers carried versions declares none (see StageAdapter).
        declared = {output.get("name") for output in config.get("output", [])}
        self.reports_versions = wire.version_output(wire.INTEREST_STAGES[0]) in declared
        self.store = self.options.store()
        # Loaded now, from each stage's newest version, so that readiness means ready; the
        # first batch checks these are the versions the server serves (else reloads).
        self.engine: SessionEngine | None = SessionEngine.from_repository(
            self.repository, rewindow_block=self.options.rewindow_block
        )
        self._installed = self._installs(self.engine.versions)
        self.spec: StageSpec = session_spec(self.engine.dims, self.options)
        self._next_check = 0.0
        self.metrics = SessionMetrics(self.pb_utils)
        # The store is shared with the publisher: it expires unused states and publishes
        # the metrics once a second, requests or not (they had waited for a request, so
        # a burst followed by quiet was never published, nor were states expired).
        self._lock = threading.Lock()
        self.publisher = Publisher(self._publish, self.pb_utils.Logger.log_error)

    def _publish(self) -> None:
        with self._lock:
            self.store.expire()
            stats = self.store.stats()
        self.metrics.update(stats)

    def execute(self, requests: list[Any]) -> list[Any]:
        with self._lock:
            return self._execute(requests)

    def _execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb_utils
        try:
            engine = self._engine()
        except NoServingVersionError as exc:
            return [_error(pb, exc, pb.TritonError.UNAVAILABLE) for _ in requests]
        except Exception as exc:
            pb.Logger.log_error(f"session: {traceback.format_exc()}")
            return [_error(pb, exc, pb.TritonError.INTERNAL) for _ in requests]
        responses: list[Any] = [None] * len(requests)
        rows: list[_Row] = []
        for i, request in enumerate(requests):
            try:
                rows.extend(self._rows(i, request, engine.dims.max_events))
            except (InputError, struct.error) as exc:  # struct: a BYTES buffer that won't parse
                responses[i] = _error(pb, f"session: bad input: {exc}", pb.TritonError.INVALID_ARG)
            except Exception as exc:  # ours, and this request's alone
                pb.Logger.log_error(f"session: {traceback.format_exc()}")
                responses[i] = _error(pb, exc, pb.TritonError.INTERNAL)
        answers = serve_rows(self.store, engine, rows)
        by_request: dict[int, list[RowAnswer]] = {}
        for row, answer in zip(rows, answers, strict=True):
            if isinstance(answer, InputError):
                message = f"session: bad input: {answer}"
                responses[row.request] = _error(pb, message, pb.TritonError.INVALID_ARG)
            elif isinstance(answer, Exception):
                pb.Logger.log_error(f"session: {answer!r}")
                responses[row.request] = _error(pb, answer, pb.TritonError.INTERNAL)
            else:
                by_request.setdefault(row.request, []).append(answer)
        for i, answers_i in by_request.items():
            if responses[i] is None:
                responses[i] = self._response(answers_i, engine, requested(requests[i]))
        return responses

    def finalize(self) -> None:
        if getattr(self, "publisher", None) is not None:  # not if initialize failed first
            self.publisher.stop()
        self.engine = None

    # --- steps --------------------------------------------------------------------------

    def _engine(self) -> SessionEngine:
        """The engine of the versions the server serves (reloaded after a swap, every state
        dropped with the old versions). The server is asked at most every
        `version_check_s` (each question is a round trip per stage): for that long after
        a swap, sessions still answer, consistently, from the old versions."""
        now = time.monotonic()
        if self.engine is not None and now < self._next_check:
            return self.engine
        serving = {}
        for name in SESSION_STAGES:
            ready = next(
                (v for v in reversed(versions_of(self.repository / name)) if self._ready(name, v)),
                None,
            )
            if ready is None:
                raise NoServingVersionError(f"{name}: no version is loaded and ready")
            serving[name] = ready
        key = tuple((name, str(v)) for name, v in serving.items())
        installed = self._installs(key)
        if self.engine is None or self.engine.versions != key or installed != self._installed:
            self.engine = None
            self.store.clear()
            self.engine = SessionEngine.from_repository(
                self.repository, serving, self.options.rewindow_block
            )
            self._installed = installed
            self.spec = session_spec(self.engine.dims, self.options)
            self.pb_utils.Logger.log_info(f"session: serving with {dict(key)}")
        self._next_check = time.monotonic() + self.options.version_check_s
        return self.engine

    def _installs(self, versions: Versions) -> tuple[tuple[int, int], ...]:
        """Which install of each version directory these are (its manifest's inode and
        time): a swap that failed removes its version, and the next one installs other
        weights under the same number, which the numbers alone would not show."""
        out = []
        for name, version in versions:
            try:
                found = (self.repository / name / version / MANIFEST).stat()
            except OSError as exc:  # removed since it was ready: a swap is under way
                raise NoServingVersionError(f"{name} v{version}: {exc}") from exc
            out.append((found.st_ino, found.st_mtime_ns))
        return tuple(out)

    def _ready(self, name: str, version: int) -> bool:
        """Whether the server serves `version` of stage `name`. A server that cannot say
        (it is stopping: "Server not ready") serves nothing: the request is UNAVAILABLE,
        which the client retries, not a failure of ours (INTERNAL), which it would not."""
        try:
            return bool(self.pb_utils.is_model_ready(name, str(version)))
        except Exception as exc:
            raise NoServingVersionError(f"{name}: readiness unknown ({exc})") from exc

    def _rows(self, i: int, request: Any, max_events: int) -> list[_Row]:
        inputs = read_inputs(self.pb_utils, request, self.spec)
        check_event_width(inputs, max_events)
        out = []
        for j in range(len(inputs[wire.SESSION_ID])):
            row = {name: value[j] for name, value in inputs.items()}
            out.append(_Row(i, session_id(row[wire.SESSION_ID]), session_op(row), row))
        return out

    def _response(
        self,
        answers: list[RowAnswer],
        engine: SessionEngine,
        asked: set[str] | None = None,
    ) -> Any:
        """The answers of one request, with the stage versions of the engine that gave
        them (every state it holds was computed by them); only the outputs it `asked` for
        (None: all), since each tensor made costs the stub a transfer that Triton would
        then drop."""
        pb = self.pb_utils
        embeddings, status, held, read = zip(*answers, strict=True)
        outputs = {
            wire.USER_EMBEDDING: lambda: np.stack(embeddings).astype(np.float32),
            wire.SESSION_STATUS: lambda: np.array(status, np.int32)[:, None],
            wire.SESSION_EVENTS: lambda: np.array(held, np.int32)[:, None],
            wire.SESSION_READ: lambda: np.array(read, np.int64)[:, None],
        }
        for stage, version in engine.versions if self.reports_versions else ():
            outputs[wire.version_output(stage)] = partial(
                np.full, (len(answers), 1), int(version), np.int64
            )
        return pb.InferenceResponse(
            output_tensors=[
                pb.Tensor(name, make())
                for name, make in outputs.items()
                if asked is None or name in asked
            ]
        )


def serve_rows(
    store: StateStore, engine: SessionEngine, rows: list[_Row]
) -> list[RowAnswer | Exception]:
    """Each row's answer or its error, in order. A session named by
    several rows of one batch is advanced by them one after the other (rounds), never twice
    from the same state. A request answers as a whole: if one of its rows failed, none of
    its rows count (`undo_failed_requests`)."""
    seen: dict[str, int] = {}
    rounds: list[list[int]] = []
    for k, row in enumerate(rows):
        n = seen.get(row.session, 0)
        seen[row.session] = n + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append(k)
    store.expire()  # an expired state is not one to put back on failure
    before = {row.session: store.peek(row.session) for row in rows}
    answers: list = [None] * len(rows)
    for ks in rounds:
        for k, answer in zip(ks, _serve_round(store, engine, [rows[k] for k in ks]), strict=True):
            answers[k] = answer
    undo_failed_requests(store, rows, answers, before)
    return answers


def undo_failed_requests(
    store: StateStore,
    rows: list[_Row],
    answers: list[RowAnswer | Exception],
    before: dict[str, SessionState | None],
) -> None:
    """The sessions that a failed request's rows changed get back the state they had
    before this batch (the caller, told the request failed, must find none of its events
    applied, and may send the good ones again). A session that a request which succeeded
    also changed in this batch cannot be put back without undoing that one: it is
    dropped, and its next update is answered STATUS_UNKNOWN (the client starts it again
    from its kept window)."""
    outcomes = list(zip(rows, answers, strict=True))
    failed = {row.request for row, answer in outcomes if isinstance(answer, Exception)}
    if not failed:
        return
    by_failed, by_good = set(), set()
    for row, answer in outcomes:
        if not isinstance(answer, Exception):
            (by_failed if row.request in failed else by_good).add(row.session)
    for session in by_failed:
        prior = before.get(session)
        if session in by_good or prior is None:
            store.forget(session)
        else:
            store.put(session, prior)


def _serve_round(
    store: StateStore, engine: SessionEngine, rows: list[_Row]
) -> list[RowAnswer | Exception]:
    """Rows of distinct sessions; those that advance run as one batch (one row alone if
    the batch fails, so one row never fails its neighbours)."""
    zeros = np.zeros(engine.dims.embed_dim, np.float32)
    answers: list[RowAnswer | Exception | None] = [None] * len(rows)
    todo: list[tuple[int, SessionState | None]] = []
    for k, row in enumerate(rows):
        if row.op == wire.OP_FORGET:
            store.forget(row.session)
            answers[k] = RowAnswer(zeros, wire.STATUS_FORGOTTEN, 0, 0)
        elif row.op == wire.OP_START:
            todo.append((k, None))
        else:
            state = store.get(row.session, engine.versions)
            if state is None:
                answers[k] = RowAnswer(zeros, wire.STATUS_UNKNOWN, 0, 0)
            else:
                todo.append((k, state))
    if todo:
        batch = [(state, rows[k].inputs) for k, state in todo]
        try:
            results = engine.advance(batch)
        except Exception:
            results = []
            for item in batch:
                try:
                    results.extend(engine.advance([item]))
                except Exception as exc:
                    traceback.print_exc(file=sys.stderr)
                    results.append(exc)
        for (k, _), result in zip(todo, results, strict=True):
            if isinstance(result, Advanced) and not finite(result):
                # A stage version's fault: never stored (every later step would read it).
                answers[k] = NonFiniteOutputError(
                    f"session {rows[k].session!r}: E_t or its state is not finite"
                )
            elif isinstance(result, Advanced):
                state = result.state
                store.put(rows[k].session, state)
                answers[k] = RowAnswer(result.embedding, wire.STATUS_OK, state.n_events, state.read)
            else:
                answers[k] = result
    return answers  # type: ignore[return-value]


def finite(advanced: Advanced) -> bool:
    """Whether E_t and the state a next step reads (LSTM state, newest token) are finite."""
    state = advanced.state
    return all(map(all_finite, (advanced.embedding, state.lstm_h, state.lstm_c, state.newest)))


def requested(request: Any) -> set[str] | None:
    """The outputs a request asked for (None where the backend does not say: all)."""
    names = getattr(request, "requested_output_names", None)
    return set(names()) if names is not None else None


def check_event_width(inputs: dict[str, np.ndarray], max_events: int) -> None:
    """The event tensors of a request share one width, at most L, holding every event
    that EVENT_COUNT says each row sends."""
    widths = {name: inputs[name].shape[1] for name in EVENT_TENSORS}
    width = widths[wire.EVENT_TIME]
    if len(set(widths.values())) > 1:
        shown = ", ".join(f"{name} {w}" for name, w in widths.items())
        raise InputError(", ".join(widths), f"events axes must be equal, got {shown}")
    if width > max_events:
        raise InputError(", ".join(widths), f"{width} events a row; at most {max_events}")
    counts = inputs[wire.EVENT_COUNT].reshape(-1)
    if len(counts) and int(counts.max()) > width:
        raise InputError(wire.EVENT_COUNT, f"{int(counts.max())} events, but {width} were sent")


def session_id(value: Any) -> str:
    raw = value.reshape(-1)[0]
    raw = raw if isinstance(raw, bytes) else bytes(raw)
    if not 0 < len(raw) <= wire.MAX_SESSION_ID_BYTES:
        raise InputError(
            wire.SESSION_ID, f"{len(raw)} bytes; must be 1-{wire.MAX_SESSION_ID_BYTES}"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(wire.SESSION_ID, "not UTF-8") from exc


def session_op(row: dict[str, np.ndarray]) -> int:
    op = int(row[wire.SESSION_OP].reshape(-1)[0])
    ops = (wire.OP_UPDATE, wire.OP_START, wire.OP_FORGET)
    if op not in ops:
        raise InputError(wire.SESSION_OP, f"must be one of {ops}, got {op}")
    return op


def _error(pb_utils: ModuleType, exc: object, code: int) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc), code))


class SessionMetrics:
    """The store as Prometheus metrics on the server's metrics port: gauges
    `dynemb_session_users`, `dynemb_session_bytes`; counters `dynemb_session_hits_total`,
    `_misses_total`, `_stale_total`, `_evictions_total`, `_expirations_total`, published
    once a second by the adapter's Publisher."""

    GAUGES = ("users", "bytes")

    def __init__(self, pb_utils: ModuleType) -> None:
        self._counters = CounterIncreases()
        self._metrics = {}
        for f in fields(StoreStats):
            gauge = f.name in self.GAUGES
            family = pb_utils.MetricFamily(
                name=f"dynemb_session_{f.name}{'' if gauge else '_total'}",
                description=f"Session store: {f.name}",
                kind=pb_utils.MetricFamily.GAUGE if gauge else pb_utils.MetricFamily.COUNTER,
            )
            self._metrics[f.name] = (family, family.Metric(labels={"model": wire.SESSION}))

    def update(self, stats: StoreStats) -> None:
        for name, (_, metric) in self._metrics.items():
            value = getattr(stats, name)
            if name in self.GAUGES:
                metric.set(value)
            else:
                self._counters.publish(metric, name, value)
