"""A session's usual step in one ONNX Runtime call: every user of a batch holds a state and
gets one new event.

The engine's general step (`SessionEngine._steps`) runs the LSTM step and MiniLM's step as
two ONNX Runtime calls, with torch in between (the token's projection) and after them (the
query-time fusion). Taking them into one call moved the in-process ratio of a full
recompute to a session step past the window from 9.9x to 10.4-10.5x at 32 users a call
(scratch runs of the sessions benchmark's in-process part). `OneEventStep` exports the
same functions of the loaded stages, composed, as one: the LSTM step
(`temporal_lstm.step`), the event's soft token and MiniLM over it and the stored keys and
values (`llm_encoder.step`, whose one-new-token attention fixes the new part's shapes),
then E_t. Nothing is computed here that the stages' own step functions do not compute;
the engine-on-either-runtime parity test holds the two paths together.

`FromNothingStep` does the same for sessions read from nothing: a new session's first
events, and past the window a re-window's kept events (26 with B = 25). In a stream a
re-window shares its batch with steps and runs alone, and through the general step
(an LSTM call, MiniLM's with its past part, torch around them) it took 4.3 ms; as one
call, exported with no past at all, 1.8 ms (scratch timings, one thread).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from dynemb.stages.llm_encoder.step import EncoderStep, KVCache, kv_names
from dynemb.stages.temporal_lstm.step import LSTMStep, LSTMSteps


class OneEvent(NamedTuple):
    """A batch's results, (B, ...) each; keys and values per layer (B, heads, K, head_dim)
    for the K tokens read (one new event: 1; from nothing: the start token and each event)."""

    embedding: np.ndarray
    h: np.ndarray
    c: np.ndarray
    newest: np.ndarray
    keys: list[np.ndarray]
    values: list[np.ndarray]


class OneEventStep:
    """One new event for each user of a batch, from their LSTM states and stored keys and
    values, through ONNX Runtime (exported from the loaded weights when it is built)."""

    def __init__(self, lstm: LSTMStep, encoder: EncoderStep) -> None:
        from dynemb.serving.runtime import OnnxFunction

        dims = lstm.network.dims
        users, layers = 2, len(encoder.layers)
        example = {
            "events": torch.randn(users, dims.event_dim),
            "time_features": torch.randn(users, dims.time_dim),
            "h0": torch.randn(users, dims.seq_dim),
            "c0": torch.randn(users, dims.seq_dim),
            "query": torch.randn(users, dims.query_dim),
        }
        dynamic = {name: {0: "users"} for name in example}
        past_example, past_dynamic = encoder.past_example(users)
        example |= past_example
        dynamic |= past_dynamic
        outputs = ("embedding", "h", "c", "newest", *kv_names(layers))
        dynamic |= {name: {0: "users"} for name in outputs}
        self.layers = layers
        self._onnx = OnnxFunction(_OneEvent(lstm, encoder), example, outputs, dynamic)

    def __call__(
        self,
        events: np.ndarray,
        time_features: np.ndarray,
        h0: np.ndarray,
        c0: np.ndarray,
        query: np.ndarray,
        past: KVCache,
    ) -> OneEvent:
        """Each user's new event's G (B, event_dim) and time features (B, time_dim), LSTM
        state, query features (B, Q) and stored keys and values -> its E_t and new state."""
        out = self._onnx(
            events=events, time_features=time_features, h0=h0, c0=c0, query=query, **past.feed()
        )
        return results(out, self.layers)


def results(out: list[np.ndarray], layers: int) -> OneEvent:
    """An exported step's outputs (E_t, h, c, newest, every layer's keys, then values)."""
    return OneEvent(*out[:4], out[4 : 4 + layers], out[4 + layers :])


class _Composed(torch.nn.Module):
    """The LSTM's and MiniLM's step functions, composed for an export."""

    def __init__(self, lstm: LSTMStep, encoder: EncoderStep) -> None:
        super().__init__()
        self.lstm = LSTMSteps(lstm.network)
        self.encoder = encoder
        d = lstm.network.dims
        self.parts = [d.text_dim, d.image_dim, d.label_dim]
        self.seq_dim = d.seq_dim


class _OneEvent(_Composed):
    """One new event a user from its state, for the export."""

    def forward(self, events, time_features, h0, c0, query, past_mask, *past):
        text, image, label = events[:, None].split(self.parts, dim=-1)
        seq, h, c = self.lstm(text, image, label, time_features[:, None], h0, c0)
        e = self.encoder
        tokens = e.tokens(seq, text, image, label)
        read = torch.ones_like(past_mask[:, :1])  # each user's one new token is real
        newest, keys, values = e.extend_torch(tokens, read, KVCache.of(past_mask, *past))
        return e.embed(newest, query), h, c, newest, *keys, *values


class FromNothingStep:
    """Sessions from nothing, each reading the same number k >= 1 of events: the LSTM from
    a zero state, MiniLM over the start token and the k events' tokens, E_t; through ONNX
    Runtime (exported from the loaded weights when it is built)."""

    def __init__(self, lstm: LSTMStep, encoder: EncoderStep) -> None:
        from dynemb.serving.runtime import OnnxFunction

        dims = lstm.network.dims
        users, new, layers = 2, 3, len(encoder.layers)
        example = {
            "events": torch.randn(users, new, dims.event_dim),
            "time_features": torch.randn(users, new, dims.time_dim),
            "query": torch.randn(users, dims.query_dim),
        }
        per_event = {0: "users", 1: "new"}
        dynamic = {"events": per_event, "time_features": per_event, "query": {0: "users"}}
        outputs = ("embedding", "h", "c", "newest", *kv_names(layers))
        dynamic |= {name: {0: "users"} for name in outputs[:4]}
        dynamic |= {name: {0: "users", 2: "tokens"} for name in outputs[4:]}
        self.layers = layers
        self._onnx = OnnxFunction(_FromNothing(lstm, encoder), example, outputs, dynamic)

    def __call__(
        self, events: np.ndarray, time_features: np.ndarray, query: np.ndarray
    ) -> OneEvent:
        """Each user's events' G (B, k, event_dim), their time features (B, k, time_dim)
        and query features (B, Q) -> E_t and the state after them (k + 1 tokens read)."""
        out = self._onnx(events=events, time_features=time_features, query=query)
        return results(out, self.layers)


class _FromNothing(_Composed):
    """k events a user from nothing, for the export: no past, so MiniLM's graph has no
    past part."""

    def forward(self, events, time_features, query):
        users = events.shape[0]
        text, image, label = events.split(self.parts, dim=-1)
        zeros = events.new_zeros(()).expand(users, self.seq_dim)
        seq, h, c = self.lstm(text, image, label, time_features, zeros, zeros)
        e = self.encoder
        tokens = torch.cat(
            [e.start_token.expand(users, 1, -1), e.tokens(seq, text, image, label)], 1
        )
        read = torch.ones_like(tokens[..., 0], dtype=torch.bool)
        newest, keys, values = e.extend_torch(tokens, read, e.empty(users))
        return e.embed(newest, query), h, c, newest, *keys, *values
