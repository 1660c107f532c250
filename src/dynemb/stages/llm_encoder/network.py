"""llm_encoder: pretrained MiniLM over the projected per-event vectors -> E_t."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel

from dynemb.dims import Dims
from dynemb.stages.llm_encoder import LLMEncoderParams, minilm_path


def load_minilm(bert: BertModel) -> None:
    """Copy MiniLM's pretrained weights into `bert` (offline, from the installed package).

    A config with fewer layers keeps MiniLM's first ones; the pooler is unused and
    position_ids is a buffer."""
    layers = bert.config.num_hidden_layers
    weights = {}
    for key, value in load_file(str(minilm_path() / "model.safetensors")).items():
        key = key.removeprefix("bert.")
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue
        if key.startswith("encoder.layer.") and int(key.split(".")[2]) >= layers:
            continue
        weights[key] = value
    missing, unexpected = bert.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"MiniLM weights do not fit: missing {missing}, extra {unexpected}")


class CausalEncoder(nn.Module):
    """E after each prefix of the events: `states` (B, n + 1, H), state k having read the
    first k events, and `embed` (state, query features) -> unit-norm E. Serving reads the
    newest state (`forward`); training reads them all (`forward_all`)."""

    def states(self, seq_features, text_vec, image_vec, label_vec, event_mask) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, states: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        seq_features: torch.Tensor,
        text_vec: torch.Tensor,
        image_vec: torch.Tensor,
        label_vec: torch.Tensor,
        event_mask: torch.Tensor,
        query_features: torch.Tensor,
    ) -> torch.Tensor:
        """(B, L, *) per-event tensors, (B, L) mask, (B, Q) -> (B, embed_dim), unit norm."""
        states = self.states(seq_features, text_vec, image_vec, label_vec, event_mask)
        newest = states[torch.arange(states.shape[0]), event_mask.sum(1).long()]
        return self.embed(newest, query_features)

    def forward_all(
        self,
        seq_features: torch.Tensor,
        text_vec: torch.Tensor,
        image_vec: torch.Tensor,
        label_vec: torch.Tensor,
        event_mask: torch.Tensor,
        query_features: torch.Tensor,
    ) -> torch.Tensor:
        """E after every prefix: (B, n + 1, D) from (B, n + 1, Q) query features, where row k
        holds the features of the query time that follows the first k events."""
        states = self.states(seq_features, text_vec, image_vec, label_vec, event_mask)
        return self.embed(states, query_features)


class LLMEncoder(CausalEncoder):
    """[F_t ⊕ G] of each event becomes a soft token (`inputs_embeds`) after a learned start
    token; MiniLM reads them causally (each token sees itself and the events before it).
    The state of the newest token (MiniLM's output plus the token itself), plus a projection
    of the query time's features, is projected and L2-normalised into E_t. An empty history
    reads the start token alone, so it still has a finite embedding.

    Causal attention makes the state after k events the same whether or not later events
    follow, so training scores every prefix of a sequence in one pass (`forward_all`) and
    serving (`forward`) reads the newest one: the same function.
    """

    def __init__(self, dims: Dims, params: LLMEncoderParams) -> None:
        super().__init__()
        self.dims = dims
        raw = params.bert_config
        config = BertConfig(**{k: v for k, v in raw.items() if not k.startswith("_")})
        config.is_decoder = True  # causal self-attention
        config.use_cache = False
        config._attn_implementation = "eager"  # deterministic, mask-exact on CPU
        self.bert = BertModel(config, add_pooling_layer=False)
        hidden = config.hidden_size
        self.event_proj = nn.Linear(dims.seq_dim + dims.event_dim, hidden)
        self.start_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.query_proj = nn.Linear(dims.query_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dims.embed_dim)

    def load_pretrained(self) -> None:
        """Copy the pretrained MiniLM weights in (offline, from the installed package)."""
        load_minilm(self.bert)

    def states(
        self,
        seq_features: torch.Tensor,
        text_vec: torch.Tensor,
        image_vec: torch.Tensor,
        label_vec: torch.Tensor,
        event_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, n, *) per-event tensors, (B, n) mask -> (B, n + 1, hidden); state k has read
        the start token and the first k events (padding sits after the real events)."""
        events = self.tokens(seq_features, text_vec, image_vec, label_vec)
        start = self.start_token.expand(events.shape[0], 1, -1)
        tokens = torch.cat([start, events], dim=1)
        mask = torch.cat([event_mask.new_ones((event_mask.shape[0], 1)), event_mask], dim=1)
        encoded = self.bert(inputs_embeds=tokens, attention_mask=mask.long()).last_hidden_state
        # Residual around the (frozen) MiniLM layers: state k also carries token k itself,
        # the newest event's projection, so the trainable path below MiniLM reaches E_t
        # directly (valid NDCG@10 +0.008 on ML-100k, training-choices-ml100k.md).
        return encoded + tokens

    def tokens(self, seq_features, text_vec, image_vec, label_vec) -> torch.Tensor:
        """The soft token of each event: (..., seq_dim), (..., text/image/label) -> (..., H)."""
        return self.event_proj(torch.cat([seq_features, text_vec, image_vec, label_vec], -1))

    def embed(self, states: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        """States (..., hidden) and query features (..., Q) -> unit-norm E_t (..., D). The
        norm is taken in fp32 (a no-op there): under bf16/fp16 autocast E_t stays unit-norm."""
        out = self.out(self.norm(states + self.query_proj(query_features)))
        return F.normalize(out.float(), dim=-1)
