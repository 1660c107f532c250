"""label_mlp: embedding-bag of each event's label ids -> MLP -> one vector per event."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dynemb.dims import Dims
from dynemb.stages.label_mlp import LabelMLPParams


class LabelMLP(nn.Module):
    """Mean of the label embeddings (padding id 0 excluded), then a two-layer MLP."""

    def __init__(self, dims: Dims, params: LabelMLPParams) -> None:
        super().__init__()
        self.dims = dims
        bag_dim = params.bag_dim or 2 * dims.label_dim
        self.bag = nn.EmbeddingBag(params.n_labels, bag_dim, mode="mean", padding_idx=0)
        self.mlp = nn.Sequential(
            nn.Linear(bag_dim, bag_dim), nn.GELU(), nn.Linear(bag_dim, dims.label_dim)
        )
        self.norm = nn.LayerNorm(dims.label_dim)

    def forward(self, label_ids: torch.Tensor) -> torch.Tensor:
        """(B, L, M) ids -> (B, L, label_dim)."""
        batch, events, labels = label_ids.shape
        pooled = self.bag(label_ids.reshape(batch * events, labels))
        return self.norm(self.mlp(pooled)).reshape(batch, events, self.dims.label_dim)

    def encode(self, label_ids: torch.Tensor) -> torch.Tensor:
        """(N, M) ids -> (N, label_dim), one event's labels per row: the same function as
        `forward`, with the bag's mean written out (padding id 0 left out, an empty bag is
        zeros) so that it exports to ONNX and serving can cache it per label set."""
        real = (label_ids != 0).unsqueeze(-1).to(self.bag.weight.dtype)
        summed = (F.embedding(label_ids, self.bag.weight) * real).sum(1)
        pooled = summed / real.sum(1).clamp(min=1.0)
        return self.norm(self.mlp(pooled))


class LabelRows(nn.Module):
    """The served function: `LabelMLP.encode`, one event's labels per row."""

    def __init__(self, network: LabelMLP) -> None:
        super().__init__()
        self.network = network

    def forward(self, label_ids: torch.Tensor) -> torch.Tensor:
        return self.network.encode(label_ids)


class LabelEvents(nn.Module):
    """The stage-level function (`stage.onnx`): (B, L, M) ids -> (B, L, label_dim), every
    event's labels through `LabelMLP.encode` (the same function as `forward`, with the
    bag's mean written out so that it exports)."""

    def __init__(self, network: LabelMLP) -> None:
        super().__init__()
        self.network = network

    def forward(self, label_ids: torch.Tensor) -> torch.Tensor:
        d = self.network.dims  # constants, so that the export's dims are fixed
        vec = self.network.encode(label_ids.reshape(-1, d.max_labels))
        return vec.reshape(-1, d.max_events, d.label_dim)
