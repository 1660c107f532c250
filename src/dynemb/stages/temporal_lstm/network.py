"""temporal_lstm: an LSTM over the event sequence -> F_t, one state per event."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dynemb.dims import Dims
from dynemb.stages.temporal_lstm import TemporalLSTMParams


class TemporalLSTM(nn.Module):
    """Reads G = text ⊕ image ⊕ label with the time features of each event, oldest first.

    Padding sits after the real events and the LSTM is causal, so real states never see
    padding; padded positions are zeroed on the way out.
    """

    def __init__(self, dims: Dims, params: TemporalLSTMParams) -> None:
        super().__init__()
        self.dims = dims
        self.inp = nn.Linear(dims.event_dim + dims.time_dim, dims.seq_dim)
        self.lstm = nn.LSTM(dims.seq_dim, dims.seq_dim, batch_first=True)
        self.norm = nn.LayerNorm(dims.seq_dim)

    def forward(
        self,
        text_vec: torch.Tensor,
        image_vec: torch.Tensor,
        label_vec: torch.Tensor,
        time_features: torch.Tensor,
        event_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, L, *) per-event tensors, (B, L) mask -> (B, L, seq_dim)."""
        x = torch.cat([text_vec, image_vec, label_vec, time_features], dim=-1)
        states, _ = self.lstm(F.gelu(self.inp(x)))
        return self.norm(states) * event_mask.unsqueeze(-1).to(states.dtype)
