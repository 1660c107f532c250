"""Advance sessions by their new events: the session wiring.

For a session's new events the engine runs the per-item stages (text_rnn, image_cnn,
label_mlp, through their serving runners and caches) on those events only, one LSTM step
per event from the stored state, and MiniLM over the new tokens attending to the stored
keys and values; then the query-time fusion (under ONNX Runtime the usual batch, one
event for each user holding a state, is one call: dynemb.sessions.fused). The model is
causal (per-event time features read only earlier events, the LSTM runs forward, MiniLM
attends causally), so within the window the result is the full recompute's, at the cost
of the new events.

Past the window (a session holding L events that gets another) E_t keeps its meaning, the
embedding of exactly the events the session's window holds: it re-windows to its newest
L - B + 1 events (dynemb.sessions.state.window_after; B is the `rewindow_block`) and
recomputes the sequence part (time features, LSTM, MiniLM) over their stored vectors G,
then steps again for the next B - 1 events; per-item work is still done once per event.
With B = 1 the window is always the newest L events, recomputed at every event through
the serving runtimes, and a full window keeps no keys, values or LSTM state (its next
event changes its oldest one): about 35 kB a session instead of 0.36 MB.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynemb.dims import Dims
from dynemb.errors import InputError
from dynemb.manifest import Manifest
from dynemb.pipeline import latest_version
from dynemb.sessions.fused import FromNothingStep, OneEventStep
from dynemb.sessions.spec import SessionOptions
from dynemb.sessions.state import (
    SessionState,
    Versions,
    appended,
    check_block,
    window_after,
)
from dynemb.stages import Runner, load_runner
from dynemb.stages.llm_encoder.step import EncoderStep, KVCache
from dynemb.stages.preprocess.features import (
    Preprocessor,
    SessionEvents,
    TimeRows,
    label_row_bytes,
    query_feature_batch,
    time_feature_batch,
)
from dynemb.stages.temporal_lstm.step import LSTMStep
from dynemb_client import contract as wire

PREPROCESS = "preprocess"
PER_ITEM = ("text_rnn", "image_cnn", "label_mlp")  # -> TEXT_VEC, IMAGE_VEC, LABEL_VEC
SEQUENCE = "temporal_lstm"
ENCODER = "llm_encoder"
SESSION_STAGES = (PREPROCESS, *PER_ITEM, SEQUENCE, ENCODER)


@dataclass(frozen=True)
class Advanced:
    """One session after its new events: its new state and E_t (D,)."""

    state: SessionState
    embedding: np.ndarray


@dataclass
class _Plan:
    """One request's work: the state it extends (None = from nothing), its new rows of G
    and time features, and the query features."""

    base: SessionState | None
    events: SessionEvents
    times: np.ndarray  # every event the new state holds
    labels: list[list[str]]
    ratings: np.ndarray
    label_bytes: int  # label_row_bytes(labels)
    g_all: np.ndarray  # (n, event_dim) of the new state
    g_new: np.ndarray  # (k, event_dim) rows the LSTM and MiniLM read now
    first: int  # the first of `times` read now (g_new's): k = len(times) - first
    # A full window: recomputed whole, no keys, values or LSTM state kept. (A re-window
    # below L is a plan with base None: steps from nothing over its stored G, so its keys,
    # values and LSTM state are kept for the events that follow.)
    windowed: bool
    read: int  # events the session will have read (SessionState.read)
    # The batch's time and query features, each in one pass over every plan of it.
    time_new: np.ndarray | None = None  # (k, time_dim)
    query: np.ndarray | None = None  # (Q,)


class SessionEngine:
    def __init__(
        self,
        versions: Versions,
        dims: Dims,
        preprocessor: Preprocessor,
        item_runners: Mapping[str, Runner],
        sequence_runners: Mapping[str, Runner],
        lstm: LSTMStep,
        encoder: EncoderStep,
        rewindow_block: int = 1,
        one_event: OneEventStep | None = None,
        from_nothing: FromNothingStep | None = None,
    ) -> None:
        check_block(rewindow_block, dims.max_events)
        self.versions = versions
        self.dims = dims
        self.preprocessor = preprocessor
        self.item_runners = dict(item_runners)
        self.sequence_runners = dict(sequence_runners)  # serving runtimes, for full windows
        self.lstm = lstm
        self.encoder = encoder
        self.rewindow_block = rewindow_block
        self.one_event = one_event  # the usual step's one call, if the runtime has one
        self.from_nothing = from_nothing  # starts' and re-windows' one call, likewise

    @classmethod
    def from_repository(
        cls,
        repository: Path,
        versions: Mapping[str, int] | None = None,
        rewindow_block: int | None = None,
        runtime: str = "onnxruntime",
    ) -> SessionEngine:
        """The engine of the given stage versions (default: each stage's newest) and
        re-window block (default: the repository's `session` config's). `runtime` runs
        the LSTM and MiniLM steps ("onnxruntime": exported from the loaded weights here,
        the faster, with a batch of one event a user in one call; "torch")."""
        if rewindow_block is None:
            rewindow_block = session_options(repository).rewindow_block
        versions = dict(versions or {})
        dirs = {}
        for name in SESSION_STAGES:
            model_dir = repository / name
            dirs[name] = (
                model_dir / str(versions[name]) if name in versions else latest_version(model_dir)
            )
        runners = {name: load_runner(dirs[name]) for name in SESSION_STAGES}
        manifests = {name: Manifest.load(dirs[name]) for name in (SEQUENCE, ENCODER)}
        for name, manifest in manifests.items():
            manifest.verify(dirs[name])
        lstm = LSTMStep.load(dirs[SEQUENCE], manifests[SEQUENCE], runtime)
        encoder = EncoderStep.load(dirs[ENCODER], manifests[ENCODER], runtime)
        return cls(
            versions=tuple((name, dirs[name].name) for name in SESSION_STAGES),
            dims=runners[PREPROCESS].manifest.dims,
            preprocessor=runners[PREPROCESS].preprocessor,
            item_runners={name: runners[name] for name in PER_ITEM},
            sequence_runners={name: runners[name] for name in (SEQUENCE, ENCODER)},
            lstm=lstm,
            encoder=encoder,
            rewindow_block=rewindow_block,
            one_event=OneEventStep(lstm, encoder) if runtime == "onnxruntime" else None,
            from_nothing=FromNothingStep(lstm, encoder) if runtime == "onnxruntime" else None,
        )

    def window_after(self, held: int, new: int) -> int:
        """Events a window of `held` holds after `new` more (see state.window_after)."""
        return window_after(held, new, self.dims.max_events, self.rewindow_block)

    def advance(
        self, requests: Sequence[tuple[SessionState | None, dict[str, np.ndarray]]]
    ) -> list[Advanced | InputError]:
        """Each (state or None, one user's wire tensors holding only the new events) -> the
        advanced session, or the InputError of a request with bad input (the others still
        run, together)."""
        results: list[Advanced | InputError | None] = [None] * len(requests)
        prepared: list[tuple[int, SessionState | None, SessionEvents]] = []
        for i, (state, inputs) in enumerate(requests):
            newest = float(state.times[-1]) if state is not None and state.n_events else None
            try:
                prepared.append((i, state, self.preprocessor.session_events(inputs, newest)))
            except InputError as exc:
                results[i] = exc
        if prepared:
            g_rows = self._item_vectors([events for _, _, events in prepared])
            plans = [
                self._plan(state, events, g)
                for (_, state, events), g in zip(prepared, g_rows, strict=True)
            ]
            rows = [TimeRows(p.times, p.labels, p.first, p.ratings) for p in plans]
            at = np.array([p.events.query_time for p in plans])
            queries = query_feature_batch([p.times for p in plans], at, self.dims)
            time_rows = time_feature_batch(rows, self.dims)
            for plan, time_new, query in zip(plans, time_rows, queries, strict=True):
                plan.time_new, plan.query = time_new, query
            for (i, _, _), done in zip(prepared, self._run(plans), strict=True):
                results[i] = done
        return results  # type: ignore[return-value]

    # --- steps --------------------------------------------------------------------------

    def _item_vectors(self, batch: list[SessionEvents]) -> list[np.ndarray]:
        """G of every new event of the batch, through the per-item runners in one call
        each; split back per request."""
        counts = [len(events.times) for events in batch]
        total = sum(counts)
        if total == 0:
            return [np.zeros((0, self.dims.event_dim), np.float32) for _ in batch]
        tensors = {
            name: np.concatenate([events.tensors[name] for events in batch])[None]
            for name in batch[0].tensors
        }
        parts = []
        for runner in self.item_runners.values():
            inputs = {t.name: tensors[t.name] for t in runner.spec.inputs}
            out = runner.trim(inputs, runner(inputs))
            parts.append(out[runner.spec.outputs[0].name][0])
        g = np.concatenate(parts, axis=-1).astype(np.float32)
        return np.split(g, np.cumsum(counts)[:-1])

    def _plan(self, state: SessionState | None, events: SessionEvents, g: np.ndarray) -> _Plan:
        d = self.dims
        held = state.n_events if state is not None else 0
        times = np.concatenate([state.times, events.times]) if state else events.times
        labels = [*(state.labels if state else []), *events.labels]
        ratings = np.concatenate([state.ratings, events.ratings]) if state else events.ratings
        g_all = np.concatenate([state.events, g]) if state else g
        size = self.window_after(held, len(events.times))
        rewindow = size < len(times)  # past L: the window drops its oldest events
        if rewindow:
            # Copies: a view would keep the dropped events alive, uncounted by the store.
            keep = slice(len(times) - size, None)
            times, ratings, g_all = times[keep].copy(), ratings[keep].copy(), g_all[keep].copy()
            labels = labels[keep]
            label_bytes = label_row_bytes(labels)
        elif state is None:
            # Owned, not views of the request's tensor and the batch's G: a state must
            # hold only what the store counts.
            times, g_all = times.copy(), g_all.copy()
            label_bytes = events.label_bytes
        else:
            label_bytes = state.labels_nbytes + events.label_bytes
        # A window of L events that is recomputed (a re-window to L, or a state kept
        # without keys and values) goes through the serving runtimes and keeps nothing
        # but G; a re-window below L restarts from its stored G by steps; else a step.
        windowed = size == d.max_events and (rewindow or (state is not None and state.windowed))
        first, base = (0, None) if rewindow or windowed else (held, state)
        return _Plan(
            base=base,
            events=events,
            times=times,
            labels=labels,
            ratings=ratings,
            label_bytes=label_bytes,
            g_all=g_all,
            g_new=g_all[first:],
            first=first,
            windowed=windowed,
            read=(state.read if state is not None else 0) + len(events.times),
        )

    def _run(self, plans: list[_Plan]) -> list[Advanced]:
        """Each plan's advanced session: full windows through the serving runtimes in one
        batch; the others by steps, one batch per number of tokens MiniLM reads. A batch
        pads every user to its widest, so one re-window (26 tokens with B = 25) among 31
        one-event updates would make all 32 read 26: grouped, each reads its own."""
        groups: dict[tuple[bool, int, bool], list[int]] = {}
        for i, p in enumerate(plans):
            width = 0 if p.windowed else len(p.g_new) + (p.base is None)
            groups.setdefault((p.windowed, width, p.base is None), []).append(i)
        out: list[Advanced | None] = [None] * len(plans)
        for (windowed, _, _), which in groups.items():
            run = self._windows if windowed else self._steps
            for i, done in zip(which, run([plans[i] for i in which]), strict=True):
                out[i] = done
        return out  # type: ignore[return-value]

    def _windows(self, plans: list[_Plan]) -> list[Advanced]:
        """Full windows: the sequence stages' serving runners over all L events."""
        d = self.dims
        users, length = len(plans), d.max_events
        g = np.zeros((users, length, d.event_dim), np.float32)
        tensors = {
            "TIME_FEATURES": np.zeros((users, length, d.time_dim), np.float32),
            "EVENT_MASK": np.zeros((users, length), bool),
            "QUERY_FEATURES": np.stack([p.query for p in plans]).astype(np.float32),
        }
        for b, p in enumerate(plans):
            n = len(p.g_all)
            g[b, :n], tensors["TIME_FEATURES"][b, :n], tensors["EVENT_MASK"][b, :n] = (
                p.g_all,
                p.time_new,
                True,
            )
        cuts = np.cumsum([d.text_dim, d.image_dim])
        tensors["TEXT_VEC"], tensors["IMAGE_VEC"], tensors["LABEL_VEC"] = np.split(g, cuts, -1)
        for runner in self.sequence_runners.values():
            step = {t.name: np.ascontiguousarray(tensors[t.name]) for t in runner.spec.inputs}
            tensors.update(runner.trim(step, runner(step)))
        embeddings = tensors[runner.spec.outputs[0].name]
        nothing = np.zeros((0,), np.float32)
        return [
            Advanced(
                SessionState(
                    versions=self.versions,
                    times=p.times,
                    labels=p.labels,
                    ratings=p.ratings,
                    label_bytes=p.label_bytes,
                    events=p.g_all,
                    lstm_h=nothing,
                    lstm_c=nothing,
                    keys=nothing,
                    values=nothing,
                    newest=nothing,
                    windowed=True,
                    read=p.read,
                ),
                embeddings[b],
            )
            for b, p in enumerate(plans)
        ]

    @torch.inference_mode()
    def _steps(self, plans: list[_Plan]) -> list[Advanced]:
        """Sessions within the window: their new events from their stored state."""
        one = self.one_event
        if one is not None and all(p.base is not None and len(p.g_new) == 1 for p in plans):
            return self._one_events(plans, one)
        start, sizes = self.from_nothing, {len(p.g_new) for p in plans}
        fresh = all(p.base is None for p in plans) and len(sizes) == 1 and 0 not in sizes
        if start is not None and fresh:  # `_run` groups them so
            return self._from_nothing(plans, start)
        d = self.dims
        users = len(plans)
        longest = max(len(p.g_new) for p in plans)
        g = np.zeros((users, longest, d.event_dim), np.float32)
        tf = np.zeros((users, longest, d.time_dim), np.float32)
        mask = np.zeros((users, longest), bool)
        for b, p in enumerate(plans):
            k = len(p.g_new)
            g[b, :k], tf[b, :k], mask[b, :k] = p.g_new, p.time_new, True
        g_t, mask_t = torch.from_numpy(g), torch.from_numpy(mask)
        text, image, label = torch.split(g_t, [d.text_dim, d.image_dim, d.label_dim], dim=-1)
        zeros = np.zeros(d.seq_dim, np.float32)
        h0 = torch.from_numpy(np.stack([p.base.lstm_h if p.base else zeros for p in plans]))
        c0 = torch.from_numpy(np.stack([p.base.lstm_c if p.base else zeros for p in plans]))
        if longest:
            seq, (h, c) = self.lstm.extend(
                text, image, label, torch.from_numpy(tf), mask_t, (h0, c0)
            )
            tokens = self.encoder.tokens(seq, text, image, label)
        else:
            h, c = h0, c0
            tokens = torch.zeros((users, 0, self.encoder.start_token.shape[0]))
        token_in, token_mask = self._tokens_in(plans, tokens, mask_t)
        past = self._past(plans)
        newest, keys, values = self.encoder.extend(token_in, token_mask, past)
        read = token_mask.sum(1)
        for b in torch.nonzero(read == 0).flatten().tolist():  # no new token: as it was
            newest[b] = torch.from_numpy(plans[b].base.newest)
        query = torch.from_numpy(np.stack([p.query for p in plans]))
        embeddings = self.encoder.embed(newest, query).numpy()
        h, c, newest, read = h.numpy(), c.numpy(), newest.numpy(), read.tolist()
        # (layers, B, heads, K, head_dim): a user's new keys and values are [:, b]
        keys, values = (np.stack([t.numpy() for t in kv]) for kv in (keys, values))
        return self._advanced(plans, h, c, newest, keys, values, read, embeddings)

    def _one_events(self, plans: list[_Plan], step: OneEventStep) -> list[Advanced]:
        """`_steps` of a batch whose every user holds a state and gets one event: the LSTM
        step, MiniLM's and E_t in one call (dynemb.sessions.fused)."""
        out = step(
            events=np.stack([p.g_new[0] for p in plans]),
            time_features=np.stack([p.time_new[0] for p in plans]),
            h0=np.stack([p.base.lstm_h for p in plans]),
            c0=np.stack([p.base.lstm_c for p in plans]),
            query=np.stack([p.query for p in plans]),
            past=self._past(plans),
        )
        keys, values = np.stack(out.keys), np.stack(out.values)
        ones = [1] * len(plans)
        return self._advanced(plans, out.h, out.c, out.newest, keys, values, ones, out.embedding)

    def _from_nothing(self, plans: list[_Plan], step: FromNothingStep) -> list[Advanced]:
        """`_steps` of a batch whose every user starts from nothing (a new session, or a
        re-window's kept events) with the same number of events, in one call."""
        out = step(
            events=np.stack([p.g_new for p in plans]),
            time_features=np.stack([p.time_new for p in plans]),
            query=np.stack([p.query for p in plans]),
        )
        keys, values = np.stack(out.keys), np.stack(out.values)
        read = [keys.shape[3]] * len(plans)  # the start token and every event
        return self._advanced(plans, out.h, out.c, out.newest, keys, values, read, out.embedding)

    def _advanced(
        self,
        plans: list[_Plan],
        h: np.ndarray,
        c: np.ndarray,
        newest: np.ndarray,
        keys: np.ndarray,
        values: np.ndarray,
        read: list[int],
        embeddings: np.ndarray,
    ) -> list[Advanced]:
        """The batch's new states and E_t (B, D): the LSTM's h and c (B, seq_dim), the
        newest token's state (B, H) and the new tokens' keys and values (layers, B, heads,
        K, head_dim), of which user b read `read[b]`."""
        d = self.dims
        out = []
        for b, p in enumerate(plans):
            r = read[b]
            kv = appended(p.base, keys[:, b, :, :r], values[:, b, :, :r], d.max_events + 1)
            state = SessionState(
                versions=self.versions,
                times=p.times,
                labels=p.labels,
                ratings=p.ratings,
                label_bytes=p.label_bytes,
                events=p.g_all,
                lstm_h=h[b].copy(),
                lstm_c=c[b].copy(),
                keys=kv[0],
                values=kv[1],
                newest=newest[b].copy(),
                room=kv[2],
                read=p.read,
            )
            out.append(Advanced(state, embeddings[b]))
        return out

    def _tokens_in(
        self, plans: list[_Plan], tokens: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens MiniLM reads now and which are real: the new events' tokens, after
        the start token for a session from nothing."""
        if all(p.base is not None for p in plans):
            return tokens, mask
        users = len(plans)
        start = self.encoder.start_token.expand(users, 1, -1)
        token_in = torch.zeros((users, tokens.shape[1] + 1, tokens.shape[-1]))
        token_mask = torch.zeros((users, tokens.shape[1] + 1), dtype=torch.bool)
        for b, p in enumerate(plans):
            k = len(p.g_new)
            if p.base is None:
                token_in[b, :1], token_in[b, 1 : k + 1] = start[b], tokens[b, :k]
                token_mask[b, : k + 1] = True
            else:
                token_in[b, :k] = tokens[b, :k]
                token_mask[b, :k] = True
        return token_in, token_mask

    def _past(self, plans: list[_Plan]) -> KVCache:
        """The stored keys and values of the batch's sessions, padded to the longest: one
        (layers, B, heads, P, head_dim) array each, whose layers are the cache's tensors
        (views: one copy from the states, none per layer)."""
        longest = max((p.base.keys.shape[2] for p in plans if p.base), default=0)
        if not longest:
            return self.encoder.empty(len(plans))
        layers, heads, _, head_dim = next(p.base.keys.shape for p in plans if p.base)
        # Each position written once: the stored tokens, then zeros after them (masked
        # out, but a weight of 0 times garbage could be NaN); zeroing all first is a
        # second pass over every stored key and value.
        keys = np.empty((layers, len(plans), heads, longest, head_dim), np.float32)
        values = np.empty_like(keys)
        mask = np.zeros((len(plans), longest), bool)
        for b, p in enumerate(plans):
            n = p.base.keys.shape[2] if p.base is not None else 0
            if n:
                keys[:, b, :, :n], values[:, b, :, :n], mask[b, :n] = (
                    p.base.keys,
                    p.base.values,
                    True,
                )
            if n < longest:
                keys[:, b, :, n:], values[:, b, :, n:] = 0.0, 0.0
        return KVCache(
            tuple(map(torch.from_numpy, keys)),
            tuple(map(torch.from_numpy, values)),
            torch.from_numpy(mask),
        )


def session_options(repository: Path) -> SessionOptions:
    """The `session` model's options as its config.pbtxt sets them (defaults without one)."""
    from dynemb.configs import read_parameters  # protobuf: only when asked

    path = repository / wire.SESSION / "config.pbtxt"
    if not path.exists():
        return SessionOptions()
    return SessionOptions.from_parameters(read_parameters(path))
