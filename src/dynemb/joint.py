"""The five stages and the item tower as one module, for joint training and for export."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from dynemb.config import Dims
from dynemb.stages import TORCH_STAGES
from dynemb.stages.item_tower import ItemTower
from dynemb.stages.llm_encoder import minilm_config


class JointModel(nn.Module):
    """Holds one instance of every torch stage; `stage_hparams` rebuilds each on its own."""

    def __init__(
        self, dims: Dims, n_labels: int, n_items: int = 0, bert_config: dict | None = None
    ):
        super().__init__()
        self.dims = dims
        self.hparams = {
            "text_rnn": {},
            "image_cnn": {},
            "label_mlp": {"n_labels": n_labels},
            "temporal_lstm": {},
            "llm_encoder": {"bert_config": bert_config or minilm_config()},
        }
        self.stages = nn.ModuleDict(
            {name: TORCH_STAGES[name]()(dims, **kw) for name, kw in self.hparams.items()}
        )
        self.item_tower = ItemTower(dims, n_items)

    @classmethod
    def initial(
        cls,
        dims: Dims,
        n_labels: int,
        n_items: int = 0,
        seed: int = 0,
        bert_config: dict | None = None,
    ) -> JointModel:
        """Seeded initial weights; MiniLM and the token embeddings start pretrained."""
        torch.manual_seed(seed)
        model = cls(dims, n_labels, n_items, bert_config)
        model.stages["llm_encoder"].load_pretrained()
        bert = model.stages["llm_encoder"].bert
        model.stages["text_rnn"].embed.weight.data.copy_(bert.embeddings.word_embeddings.weight)
        return model

    def user_embedding(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ensemble's computation on preprocessed tensors (keyed by tensor name)."""
        s = self.stages
        text = s["text_rnn"](x["TOKEN_IDS"], x["TOKEN_COUNT"])
        image = s["image_cnn"](x["IMAGE_PIXELS"], x["IMAGE_MASK"])
        label = s["label_mlp"](x["LABEL_IDS"])
        seq = s["temporal_lstm"](text, image, label, x["TIME_FEATURES"], x["EVENT_MASK"])
        return s["llm_encoder"](seq, text, image, label, x["EVENT_MASK"], x["QUERY_FEATURES"])

    def item_content(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, event_dim) content vectors of N items from their preprocessed content."""
        s = self.stages
        text = s["text_rnn"](x["TOKEN_IDS"][None], x["TOKEN_COUNT"][None])[0]
        image = s["image_cnn"](x["IMAGE_PIXELS"][None], x["IMAGE_MASK"][None])[0]
        label = s["label_mlp"](x["LABEL_IDS"][None])[0]
        return torch.cat([text, image, label], dim=-1)

    def config(self) -> dict:
        return {"dims": asdict(self.dims), "hparams": self.hparams}
