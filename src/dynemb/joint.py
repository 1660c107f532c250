"""The five torch stages and the item tower as one module, for joint training and export.

This is the torch twin of the ensemble wiring (dynemb.ensembles): `user_embedding` runs
the stages in the ensemble's order on preprocessed tensors, so a checkpoint's stages
exported one by one compute exactly what was trained (a parity test checks it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dynemb import stages
from dynemb.dims import Dims
from dynemb.stages.image_cnn import ImageCNNParams
from dynemb.stages.label_mlp import LabelMLPParams
from dynemb.stages.llm_encoder import LLMEncoderParams, minilm_config
from dynemb.stages.temporal_lstm import TemporalLSTMParams
from dynemb.stages.text_rnn import TextRNNParams


@dataclass(frozen=True)
class JointParams:
    """Each torch stage's typed hyperparameters; field name = stage name."""

    text_rnn: TextRNNParams
    image_cnn: ImageCNNParams
    label_mlp: LabelMLPParams
    temporal_lstm: TemporalLSTMParams
    llm_encoder: LLMEncoderParams

    @classmethod
    def default(cls, n_labels: int, bert_config: dict[str, Any] | None = None) -> JointParams:
        return cls(
            text_rnn=TextRNNParams(),
            image_cnn=ImageCNNParams(),
            label_mlp=LabelMLPParams(n_labels=n_labels),
            temporal_lstm=TemporalLSTMParams(),
            llm_encoder=LLMEncoderParams(bert_config=bert_config or minilm_config()),
        )

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))

    def of(self, stage: str) -> Any:
        return getattr(self, stage)

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(self.of(name)) for name in self.stage_names}

    @classmethod
    def from_json(cls, raw: dict[str, dict[str, Any]]) -> JointParams:
        names = [f.name for f in fields(cls)]
        return cls(**{name: stages.get(name).params_type(**raw[name]) for name in names})


class ItemTower(nn.Module):
    """Item content G_item = text ⊕ image ⊕ label (from the same stages as events) and the
    title's sentence embedding from the whole pretrained MiniLM (`llm_encoder.sentences`,
    computed once per item), projected to E_t's space, plus an optional id embedding (row
    0 = no id / withheld).

    Each item also has a score bias (in cosine units, added to E_t · v by retrieve): unit
    vectors cannot say that an item is popular, a bias can. Part of it is predicted from
    the content and title (`prior`), so that an item without an id row (a new item) still
    gets one; the id table adds the rest."""

    def __init__(self, dims: Dims, n_items: int = 0) -> None:
        super().__init__()
        from dynemb.stages.llm_encoder.sentences import SENTENCE_DIM

        self.proj = nn.Linear(dims.event_dim, dims.embed_dim)
        self.title = nn.Linear(SENTENCE_DIM, dims.embed_dim)
        # Normalised inputs and a small output scale: one shared linear map moves every
        # item's bias at once, so at full size a single optimiser step swings them all.
        self.prior = nn.Sequential(
            nn.LayerNorm(dims.event_dim + SENTENCE_DIM), nn.Linear(dims.event_dim + SENTENCE_DIM, 1)
        )
        self.prior_scale = (dims.event_dim + SENTENCE_DIM) ** -0.5
        nn.init.zeros_(self.prior[1].weight)
        nn.init.zeros_(self.prior[1].bias)
        # Row 0 (no id) stays zero: padding_idx keeps it out of every gradient, so that an
        # item without an id row is scored by its content and title alone.
        self.ids = nn.Embedding(n_items + 1, dims.embed_dim, padding_idx=0) if n_items else None
        self.bias = nn.Embedding(n_items + 1, 1, padding_idx=0) if n_items else None
        for table in (self.ids, self.bias):
            if table is not None:
                nn.init.zeros_(table.weight)

    def forward(
        self, content: torch.Tensor, title: torch.Tensor, item_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, event_dim) content, (N, SENTENCE_DIM) title embeddings -> (N, embed_dim)."""
        vectors = self.proj(content) + self.title(title)
        if self.ids is not None and item_index is not None:
            vectors = vectors + self.ids(item_index)
        return F.normalize(vectors, dim=-1)

    def item_bias(
        self, content: torch.Tensor, title: torch.Tensor, item_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N,) score bias of each item: the content prior, plus the id row's (0 for row 0
        and for a tower without ids)."""
        bias = self.prior_scale * self.prior(torch.cat([content, title], dim=-1))[..., 0]
        if self.bias is not None and item_index is not None:
            bias = bias + self.bias(item_index)[..., 0]
        return bias


class JointModel(nn.Module):
    """Holds one network of every torch stage (built through the stage registry) and the
    item tower; `params` rebuilds each stage on its own."""

    def __init__(self, dims: Dims, params: JointParams, n_items: int = 0) -> None:
        super().__init__()
        self.dims = dims
        self.params = params
        self.n_items = n_items
        self.stages = nn.ModuleDict(
            {name: stages.get(name).network(dims, params.of(name)) for name in params.stage_names}
        )
        self.item_tower = ItemTower(dims, n_items)

    @classmethod
    def initial(
        cls, dims: Dims, params: JointParams, n_items: int = 0, seed: int = 0, pretrained=True
    ) -> JointModel:
        """Seeded initial weights; MiniLM and the token embeddings start pretrained (unless
        not `pretrained`: all seeded, for machines without MiniLM's weights)."""
        torch.manual_seed(seed)
        model = cls(dims, params, n_items)
        if not pretrained:
            return model
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
