"""The item tower: item content through the event stages, into E_t's space."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dynemb.config import Dims


class ItemTower(nn.Module):
    """Item content G_item = text ⊕ image ⊕ label (from the same stages as events), projected
    to E_t's space, plus an optional id embedding (row 0 = no id / withheld).

    With ids, each item also has a score bias (in cosine units, added to E_t · v by
    retrieve): unit vectors cannot say that an item is popular, a bias can."""

    def __init__(self, dims: Dims, n_items: int = 0) -> None:
        super().__init__()
        self.proj = nn.Linear(dims.event_dim, dims.embed_dim)
        self.ids = nn.Embedding(n_items + 1, dims.embed_dim) if n_items else None
        self.bias = nn.Embedding(n_items + 1, 1) if n_items else None
        for table in (self.ids, self.bias):
            if table is not None:
                nn.init.zeros_(table.weight)

    def forward(
        self, content: torch.Tensor, item_index: torch.Tensor | None = None
    ) -> torch.Tensor:
        vectors = self.proj(content)
        if self.ids is not None and item_index is not None:
            vectors = vectors + self.ids(item_index)
        return F.normalize(vectors, dim=-1)

    def item_bias(self, item_index: torch.Tensor) -> torch.Tensor:
        """(N,) score bias of each item (0 without ids, and for row 0)."""
        if self.bias is None:
            return torch.zeros(item_index.shape, dtype=torch.float32)
        return self.bias(item_index)[..., 0]
