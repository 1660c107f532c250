"""The JointModel as trained: the served computation, with text/image run per unique row.

`TrainModel.user_embedding(batch)` equals `JointModel.user_embedding` on the same
preprocessed tensors (a unit test checks it): text_rnn and image_cnn work per event and
independently of the batch, so running them once per unique text/image and gathering the
rows is the same function. Ablation variants (no time features, no text, no labels, mean
pooling instead of MiniLM) only exist here and are never exported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from dynemb.dims import Dims
from dynemb.joint import JointModel, JointParams
from dynemb.stages.llm_encoder import minilm_config
from dynemb.stages.llm_encoder.network import CausalEncoder
from dynemb.training.examples import Batch, ItemInputs, Tables


@dataclass(frozen=True)
class Variant:
    """What an ablation switches off; the default is the full model."""

    time_features: bool = True
    text: bool = True
    labels: bool = True
    item_ids: bool = True  # item-tower id embedding and user-side "item:<id>" labels
    encoder: str = "llm"  # "llm" (MiniLM) or "mean" (mean of [F_t ⊕ G], projected)
    # Pretrained text knowledge: text_rnn reads MiniLM's frozen token embeddings and the
    # item tower its title sentence embeddings. Off: seeded token embeddings that learn,
    # and no title embeddings (the item tower reads zeros).
    pretrained_text: bool = True
    titles: bool = True  # the title embeddings alone (off: zeros, token embeddings kept)


def build_joint(dims: Dims, n_labels: int, n_items: int, llm_layers: int, seed: int) -> JointModel:
    """JointModel with pretrained MiniLM (its first `llm_layers` layers) and token embeddings.

    Fewer layers change only `bert_config`, which travels in the checkpoint's hparams, so
    `Checkpoint.load` and `dynemb build` rebuild the same encoder.
    """
    params = JointParams.default(n_labels, bert_config=minilm_config(layers=llm_layers))
    return JointModel.initial(dims, params, n_items, seed)


class MeanPoolEncoder(CausalEncoder):
    """Ablation "without LLM encoder": the running mean of [F_t ⊕ G] over the events so
    far (and a learned start vector, so an empty history is defined), fused with the query
    features as LLMEncoder does. Causal like it, with the same `forward`/`forward_all`."""

    def __init__(self, dims: Dims, hidden: int = 256) -> None:
        super().__init__()
        self.event_proj = nn.Linear(dims.seq_dim + dims.event_dim, hidden)
        self.start_token = nn.Parameter(torch.zeros(hidden))
        self.query_proj = nn.Linear(dims.query_dim, hidden)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(hidden, dims.embed_dim))

    def states(self, seq, text, image, label, event_mask) -> torch.Tensor:
        real = event_mask.unsqueeze(-1).to(seq.dtype)
        events = self.event_proj(torch.cat([seq, text, image, label], -1)) * real
        start = self.start_token.expand(events.shape[0], 1, -1)
        sums = torch.cat([start, start + events.cumsum(1)], dim=1)
        counts = torch.cat([real.new_ones(real.shape[0], 1, 1), 1 + real.cumsum(1)], dim=1)
        return sums / counts

    def embed(self, states: torch.Tensor, query_features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.out(states + self.query_proj(query_features)), dim=-1)


class TrainModel(nn.Module):
    """Wraps the exported JointModel; holds the unique-text/image tables as buffers."""

    def __init__(
        self,
        joint: JointModel,
        tables: Tables,
        items: ItemInputs,
        variant: Variant = Variant(),
        scale: float = 20.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.joint = joint
        self.variant = variant
        self.scale = scale
        # Training-only regulariser on each event's text/image/label vectors (identity in
        # eval mode, so the exported stages compute exactly what was validated).
        self.event_dropout = nn.Dropout(dropout)
        self.mean_encoder = MeanPoolEncoder(joint.dims) if variant.encoder == "mean" else None
        self.register_buffer("token_ids", torch.from_numpy(tables.token_ids), persistent=False)
        self.register_buffer("token_count", torch.from_numpy(tables.token_count), False)
        self.register_buffer("pixels", torch.from_numpy(tables.pixels), persistent=False)
        self.register_buffer("item_text", torch.from_numpy(items.text), persistent=False)
        self.register_buffer("item_image", torch.from_numpy(items.image), persistent=False)
        self.register_buffer("item_mask", torch.from_numpy(items.image_mask), False)
        self.register_buffer("item_labels", torch.from_numpy(items.label_ids), False)
        self.register_buffer("item_index", torch.arange(1, len(items.text) + 1), False)
        title = torch.from_numpy(items.title)
        if not (variant.pretrained_text and variant.titles):
            title = torch.zeros_like(title)
        self.register_buffer("item_title", title, persistent=False)
        # Items that do not exist during training (the cold-item slice): out of every
        # softmax, so that their id rows stay empty and their content is never pushed away.
        self.register_buffer("withheld", torch.zeros(len(items.text), dtype=torch.bool), False)

    @property
    def stages(self) -> nn.ModuleDict:
        return self.joint.stages

    def freeze(self, llm_trainable: bool = False) -> None:
        """Freeze MiniLM's weights (gradients still flow through it to the projections
        below) and the pretrained token embeddings of text_rnn."""
        for p in self.llm_parameters():
            p.requires_grad_(llm_trainable)
        self.stages["text_rnn"].embed.weight.requires_grad_(not self.variant.pretrained_text)

    def llm_parameters(self) -> list[nn.Parameter]:
        """MiniLM's own pretrained weights (frozen unless `llm_trainable`)."""
        return list(self.stages["llm_encoder"].bert.parameters())

    def text_table(self) -> torch.Tensor:
        """text_rnn over every unique text: (n_texts, text_dim), row 0 = no text = zeros."""
        out = self.stages["text_rnn"](self.token_ids[None], self.token_count[None])[0]
        return out if self.variant.text else torch.zeros_like(out)

    def image_table(self) -> torch.Tensor:
        """image_cnn over every unique image: (n_images, image_dim); row 0 is never read."""
        mask = torch.arange(len(self.pixels), device=self.pixels.device) > 0
        return self.stages["image_cnn"](self.pixels[None], mask[None])[0]

    def _label(self, label_ids: torch.Tensor) -> torch.Tensor:
        out = self.stages["label_mlp"](label_ids)
        return out if self.variant.labels else torch.zeros_like(out)

    def _image(self, rows: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        missing = self.stages["image_cnn"].missing
        return torch.where(mask.unsqueeze(-1), table[rows], missing)

    def item_content(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(n_items, event_dim) G_item of every item, row i = item index i+1."""
        return torch.cat(
            [
                text[self.item_text],
                self._image(self.item_image, self.item_mask, image),
                self._label(self.item_labels[None])[0],
            ],
            dim=-1,
        )

    def items(
        self, text: torch.Tensor, image: torch.Tensor, with_ids: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The retrieve table, row i = item index i+1: (n_items, embed_dim) unit vectors
        and (n_items,) score biases; without ids, what an item without an id row gets."""
        return self.tower(self.item_content(text, image), with_ids)

    def tower(
        self, content: torch.Tensor, with_ids: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`items` from `item_content`'s vectors (one content, two tables in training)."""
        ids = self.item_index if with_ids else torch.zeros_like(self.item_index)
        tower = self.joint.item_tower
        return tower(content, self.item_title, ids), tower.item_bias(content, self.item_title, ids)

    def _encoder_inputs(self, b: Batch, text: torch.Tensor, image: torch.Tensor) -> tuple:
        s = self.stages
        event_mask = torch.from_numpy(b.event_mask)
        text_vec = text[torch.from_numpy(b.text)]
        image_vec = self._image(torch.from_numpy(b.image), torch.from_numpy(b.image_mask), image)
        label_vec = self._label(torch.from_numpy(b.label_ids))
        drop = self.event_dropout
        text_vec, image_vec, label_vec = drop(text_vec), drop(image_vec), drop(label_vec)
        time_f = torch.from_numpy(b.time_features)
        query_f = torch.from_numpy(b.query_features)
        if not self.variant.time_features:
            time_f, query_f = torch.zeros_like(time_f), torch.zeros_like(query_f)
        seq = s["temporal_lstm"](text_vec, image_vec, label_vec, time_f, event_mask)
        return seq, text_vec, image_vec, label_vec, event_mask, query_f

    @property
    def encoder(self) -> nn.Module:
        return self.mean_encoder if self.mean_encoder is not None else self.stages["llm_encoder"]

    def user_embedding(self, b: Batch, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """E_t for a batch of requests (`collate`), from this step's text/image tables."""
        return self.encoder(*self._encoder_inputs(b, text, image))

    def window_embeddings(self, b: Batch, text: torch.Tensor, image: torch.Tensor):
        """(B, n + 1, D): E after every prefix of each window (`collate_windows`)."""
        return self.encoder.forward_all(*self._encoder_inputs(b, text, image))

    def logits(
        self, user: torch.Tensor, items: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scaled cosine of E_t with every item: the softmax over all items."""
        scores = user @ items.T
        return self.scale * (scores if bias is None else scores + bias)
