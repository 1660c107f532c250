"""llm_encoder in plain torch over the saved state dict: one step at a time for sessions,
and the newest state alone for the served export.

No transformers import (a session process that imported it would start ~10 s slower
here). It computes what `LLMEncoder.states` and `embed` compute, held to them by the
session and runtime parity tests: BERT's absolute position and token-type embeddings,
post-LayerNorm self-attention (causal) and GELU feed-forward layers, then the residual
with the token itself and the projection to E_t.

- `EncoderStep.extend`: new tokens with the keys and values of the tokens read before
  (sessions); it returns the newest new token's state only. Nothing reads the others,
  and under causal attention the last layer needs every token's keys and values but the
  query, attention and feed-forward of the newest token only: for a whole sequence of 51
  tokens through MiniLM's 2 layers that is 41% fewer multiply-adds than the network's
  forward, for a session's re-window of 26 about as much.
- `EncoderStep.newest`: `extend` of a whole sequence from nothing. `NewestEmbedding`
  wraps it as the served function that `model.onnx` exports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from dynemb.manifest import Manifest


class KVCache(NamedTuple):
    """The keys and values of the tokens read so far, for a batch of users: one
    (B, heads, P, head_dim) tensor per layer each (separate inputs, so that no layer's
    past is sliced out of a larger one: under ONNX Runtime a slice is a copy), and which
    of the P positions are real (B, P): users of one batch have read different numbers
    of tokens, real ones first."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask: torch.Tensor

    def feed(self) -> dict[str, np.ndarray]:
        """As an exported function's inputs (see `EncoderStep.past_example`)."""
        names = kv_names(len(self.keys), "past_")
        arrays = zip(names, (*self.keys, *self.values), strict=True)
        return {"past_mask": self.mask.numpy()} | {name: t.numpy() for name, t in arrays}

    @classmethod
    def of(cls, past_mask: torch.Tensor, *past: torch.Tensor) -> KVCache:
        """`feed`'s inputs as an exported function's forward receives them."""
        layers = len(past) // 2
        return cls(tuple(past[:layers]), tuple(past[layers:]), past_mask)


@dataclass(frozen=True)
class _Layer:
    qkv_w: torch.Tensor  # (3H, H): query, key, value stacked
    qkv_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    ln1: tuple[torch.Tensor, torch.Tensor]
    up_w: torch.Tensor
    up_b: torch.Tensor
    down_w: torch.Tensor
    down_b: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor]


class EncoderStep:
    def __init__(self, state: dict[str, torch.Tensor], bert_config: dict) -> None:
        if bert_config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"llm_encoder step: hidden_act {bert_config['hidden_act']!r}")
        if bert_config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("llm_encoder step: only absolute position embeddings")
        self.heads = int(bert_config["num_attention_heads"])
        self.hidden = int(bert_config["hidden_size"])
        self.head_dim = self.hidden // self.heads
        self.eps = float(bert_config.get("layer_norm_eps", 1e-12))
        s = state
        self.event_proj = (s["event_proj.weight"], s["event_proj.bias"])
        self.start_token = s["start_token"]
        self.query_proj = (s["query_proj.weight"], s["query_proj.bias"])
        self.norm = (s["norm.weight"], s["norm.bias"])
        self.out = (s["out.weight"], s["out.bias"])
        e = "bert.embeddings."
        self.positions = s[e + "position_embeddings.weight"]
        self.token_type = s[e + "token_type_embeddings.weight"][0]
        self.emb_ln = (s[e + "LayerNorm.weight"], s[e + "LayerNorm.bias"])
        self.layers = []
        for i in range(int(bert_config["num_hidden_layers"])):
            p = f"bert.encoder.layer.{i}."
            a = p + "attention."
            self.layers.append(
                _Layer(
                    qkv_w=torch.cat([s[a + f"self.{n}.weight"] for n in ("query", "key", "value")]),
                    qkv_b=torch.cat([s[a + f"self.{n}.bias"] for n in ("query", "key", "value")]),
                    out_w=s[a + "output.dense.weight"],
                    out_b=s[a + "output.dense.bias"],
                    ln1=(s[a + "output.LayerNorm.weight"], s[a + "output.LayerNorm.bias"]),
                    up_w=s[p + "intermediate.dense.weight"],
                    up_b=s[p + "intermediate.dense.bias"],
                    down_w=s[p + "output.dense.weight"],
                    down_b=s[p + "output.dense.bias"],
                    ln2=(s[p + "output.LayerNorm.weight"], s[p + "output.LayerNorm.bias"]),
                )
            )

    @classmethod
    def load(cls, directory: Path, manifest: Manifest, runtime: str = "torch") -> EncoderStep:
        from dynemb.serving.runtime import on_runtime
        from dynemb.stages.torch_stage import WEIGHTS

        state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
        step = cls(state, manifest.hparams.bert_config)
        return on_runtime(step, runtime, "llm_encoder step")

    _onnx = None  # OnnxFunction of `extend`, once use_onnxruntime() made it

    def use_onnxruntime(self) -> None:
        """Run `extend` through ONNX Runtime from now on: the same function exported from
        these weights (about 2.4x faster for one user's token here, 1.4x for 32 users',
        benchmarks/results/sessions.md), held to the torch one by a parity test."""
        from dynemb.serving.runtime import OnnxFunction

        # Two new tokens in the example: a trace of one would fix `_block`'s K = 1 path.
        users, new = 2, 2
        per_token = {0: "users", 1: "new"}
        example = {
            "tokens": torch.randn(users, new, self.hidden),
            "mask": torch.ones(users, new, dtype=torch.bool),
        }
        dynamic = {"tokens": per_token, "mask": per_token}
        past_example, past_dynamic = self.past_example(users)
        example |= past_example
        dynamic |= past_dynamic
        outputs = ("newest", *kv_names(len(self.layers)))
        dynamic |= {name: {0: "users", 2: "new"} for name in outputs[1:]}
        dynamic["newest"] = {0: "users"}
        self._onnx = OnnxFunction(_Extend(self), example, outputs, dynamic)

    def past_example(self, users: int, past: int = 3) -> tuple[dict, dict]:
        """Example inputs of a past (`KVCache.feed`'s names: its mask, then every layer's
        keys, then values) for an ONNX export, and their dynamic axes."""
        example = {"past_mask": torch.ones(users, past, dtype=torch.bool)}
        dynamic = {"past_mask": {0: "users", 1: "past"}}
        for name in kv_names(len(self.layers), "past_"):
            example[name] = torch.randn(users, self.heads, past, self.head_dim)
            dynamic[name] = {0: "users", 2: "past"}
        return example, dynamic

    def empty(self, users: int) -> KVCache:
        """The past of users who have read nothing."""

        def nothing() -> tuple[torch.Tensor, ...]:
            return tuple(torch.zeros((users, self.heads, 0, self.head_dim)) for _ in self.layers)

        return KVCache(nothing(), nothing(), torch.zeros((users, 0), dtype=torch.bool))

    def tokens(self, seq_features, text_vec, image_vec, label_vec) -> torch.Tensor:
        """The soft token of each event, as `LLMEncoder.tokens`."""
        x = torch.cat([seq_features, text_vec, image_vec, label_vec], -1)
        return F.linear(x, *self.event_proj)

    def embed(self, states: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        """As `LLMEncoder.embed`: states (..., H), query features (..., Q) -> unit-norm E."""
        x = states + F.linear(query_features, *self.query_proj)
        x = F.layer_norm(x, (self.hidden,), *self.norm, eps=1e-5)
        return F.normalize(F.linear(x, *self.out), dim=-1)

    def extend(self, tokens: torch.Tensor, mask: torch.Tensor, past: KVCache):
        """MiniLM over `tokens` (B, K, H) (real ones first, `mask` (B, K)) given the keys and
        values of every token each user has read: what `LLMEncoder.states` gives when it
        reads the whole sequence (causal attention: old tokens never look at new ones), at
        the cost of the new tokens only. Returns the state of each user's newest real new
        token (B, H) (undefined for a user with none) and the new tokens' keys and values,
        per layer (B, heads, K, head_dim). The last layer needs only the keys and values of
        the other new tokens, so it computes the rest for that token alone (a session's
        re-window of 26 tokens: 37% less time)."""
        users, new, _ = tokens.shape
        if new == 0:
            return tokens.new_zeros((users, self.hidden)), *self.empty(users)[:2]
        if self._onnx is not None:
            layers = len(self.layers)
            arrays = self._onnx(tokens=tokens.numpy(), mask=mask.numpy(), **past.feed())
            out = [torch.from_numpy(a) for a in arrays]
            return out[0], tuple(out[1 : layers + 1]), tuple(out[layers + 1 :])
        return self.extend_torch(tokens, mask, past)

    def extend_torch(self, tokens: torch.Tensor, mask: torch.Tensor, past: KVCache):
        """`extend` in torch (what the ONNX Runtime one is exported from)."""
        users, new, _ = tokens.shape
        read = past.mask.sum(1)  # tokens each user has read: the new ones' first position
        positions = read[:, None] + torch.arange(new)[None, :]
        hidden = tokens + self.token_type + self.positions[positions]
        hidden = F.layer_norm(hidden, (self.hidden,), *self.emb_ln, eps=self.eps)
        # allowed[b, j, p]: new token j of user b may attend to position p of [past ⊕ new].
        causal = torch.tril(torch.ones(new, new, dtype=torch.bool))
        allowed = torch.cat(
            [past.mask[:, None, :].expand(users, new, -1), causal[None] & mask[:, None, :]], 2
        )
        bias = self._bias(allowed, hidden.dtype)
        rows, at = torch.arange(users), (mask.sum(1) - 1).clamp(min=0)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            if i < len(self.layers) - 1:
                q, k, v = self._heads(F.linear(hidden, layer.qkv_w, layer.qkv_b))
            else:  # the last layer: keys and values of every new token, the rest for one
                h = self.hidden
                k, v = self._heads(F.linear(hidden, layer.qkv_w[h:], layer.qkv_b[h:]))
                hidden, bias = hidden[rows, at][:, None], bias[:, 0][rows, at][:, None, None]
                (q,) = self._heads(F.linear(hidden, layer.qkv_w[:h], layer.qkv_b[:h]))
            keys.append(k)
            values.append(v)
            kv = (past.keys[i], k, past.values[i], v)
            hidden = self._block(layer, hidden, q, kv, bias)
        newest = hidden[:, 0] if self.layers else hidden[rows, at]
        return newest + tokens[rows, at], tuple(keys), tuple(values)

    def newest(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The state `LLMEncoder.states` gives the newest real token of `tokens` (B, n, H),
        the start token first, real ones first (`mask` (B, n), position 0 always real),
        read from nothing: (B, H). `extend` from an empty past; what its keys and values
        would be read for is dropped (the ONNX export keeps only what this returns)."""
        return self.extend_torch(tokens, mask, self.empty(tokens.shape[0]))[0]

    def _heads(self, projected: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, R, k * H) -> k tensors (B, heads, R, head_dim): query / key / value parts."""
        users, rows, _ = projected.shape
        return tuple(
            part.view(users, rows, self.heads, self.head_dim).transpose(1, 2)
            for part in projected.split(self.hidden, dim=-1)
        )

    @staticmethod
    def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, R, P) allowed -> the additive attention bias (B, 1, R, P): 0 or dtype's min."""
        bias = torch.zeros(allowed.shape, dtype=dtype)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]

    def _block(self, layer: _Layer, hidden, q, kv, bias) -> torch.Tensor:
        """One layer for the R rows of `hidden` (B, R, H) whose queries are `q`
        (B, heads, R, head_dim), attending to the past keys and values and the new ones,
        `kv` = (past_k, k, past_v, v) (B, heads, P or K, head_dim), under `bias`
        (B, 1, R, P + K): post-LayerNorm attention, then the GELU feed-forward.

        The past and the new parts are read where they are, never concatenated: one
        softmax over both parts' scores, then each part's values weighted by its share (a
        concatenation would copy every past key and value at each step; at 40 tokens read
        that was 15% of a one-token step for 32 users). A past of no tokens (`newest`'s)
        is left out of the function altogether. With one new token (K = 1, a function
        traced for one: `dynemb.sessions.fused`) its score and its value's share are a
        dot product and a scaling; as batched 1 x 1 matrix products they were 9% of a
        one-token step for 32 users under ONNX Runtime."""
        users, rows, _ = hidden.shape
        past_k, k, past_v, v = kv
        scale = self.head_dim**-0.5
        if past_k.shape[2] == 0:
            context = ((q @ k.transpose(-1, -2) * scale + bias).softmax(-1)) @ v
        else:
            one = k.shape[2] == 1
            own = (q * k).sum(-1, keepdim=True) if one else q @ k.transpose(-1, -2)
            scores = torch.cat([q @ past_k.transpose(-1, -2), own], -1)
            weights = (scores * scale + bias).softmax(-1)
            read = past_k.shape[2]
            mine = weights[..., read:]
            context = weights[..., :read] @ past_v + (mine * v if one else mine @ v)
        context = context.transpose(1, 2).reshape(users, rows, -1)
        attended = F.layer_norm(
            F.linear(context, layer.out_w, layer.out_b) + hidden,
            (self.hidden,),
            *layer.ln1,
            eps=self.eps,
        )
        up = F.gelu(F.linear(attended, layer.up_w, layer.up_b))
        return F.layer_norm(
            F.linear(up, layer.down_w, layer.down_b) + attended,
            (self.hidden,),
            *layer.ln2,
            eps=self.eps,
        )


class _Extend(torch.nn.Module):
    """EncoderStep.extend_torch as a module, for the ONNX export."""

    def __init__(self, step: EncoderStep) -> None:
        super().__init__()
        self.step = step

    def forward(self, tokens, mask, past_mask, *past):
        newest, keys, values = self.step.extend_torch(tokens, mask, KVCache.of(past_mask, *past))
        return newest, *keys, *values


def kv_names(layers: int, prefix: str = "") -> list[str]:
    """The per-layer key and value tensors' names, keys first: `keys_0`, ..., `values_0`..."""
    return [f"{prefix}{kind}_{i}" for kind in ("keys", "values") for i in range(layers)]


class NewestEmbedding(torch.nn.Module):
    """`LLMEncoder.forward` (the served function: per-event tensors, mask and query
    features in, E_t out) through `EncoderStep.newest`: what `model.onnx` exports."""

    def __init__(self, step: EncoderStep) -> None:
        super().__init__()
        self.step = step

    @classmethod
    def of(cls, network: torch.nn.Module) -> NewestEmbedding:
        """Over a trained `LLMEncoder`'s weights and its BERT config."""
        return cls(EncoderStep(network.state_dict(), network.bert.config.to_dict()))

    def forward(self, seq_features, text_vec, image_vec, label_vec, event_mask, query_features):
        s = self.step
        events = s.tokens(seq_features, text_vec, image_vec, label_vec)
        tokens = torch.cat([s.start_token.expand(events.shape[0], 1, -1), events], dim=1)
        mask = torch.cat([event_mask.new_ones((event_mask.shape[0], 1)), event_mask], dim=1)
        return s.embed(s.newest(tokens, mask), query_features)
