"""text_rnn: a GRU over the word pieces of each event's text -> one vector per event."""

from __future__ import annotations

import torch
from torch import nn

from dynemb.dims import Dims
from dynemb.stages.text_rnn import TextRNNParams


class TextRNN(nn.Module):
    """Token embeddings (initialised from MiniLM's word embeddings) -> GRU -> last state.

    Tokens are padded at the end, so the state at position count-1 has read exactly the
    real tokens: batched and single results agree. Events without text give zeros.
    """

    def __init__(self, dims: Dims, params: TextRNNParams) -> None:
        super().__init__()
        self.dims = dims
        self.embed = nn.Embedding(params.vocab_size, params.token_dim, padding_idx=0)
        self.gru = nn.GRU(params.token_dim, dims.text_dim, batch_first=True)
        self.norm = nn.LayerNorm(dims.text_dim)

    def forward(self, token_ids: torch.Tensor, token_count: torch.Tensor) -> torch.Tensor:
        """(B, L, T) ids, (B, L) counts -> (B, L, text_dim)."""
        batch, events, tokens = token_ids.shape
        ids = token_ids.reshape(batch * events, tokens)
        count = token_count.reshape(-1)
        out = ids.new_zeros((batch * events, self.dims.text_dim), dtype=torch.float32)
        real = count > 0
        if bool(real.any()):
            out[real] = self.encode(ids[real], count[real])
        return out.reshape(batch, events, self.dims.text_dim)

    def encode(self, token_ids: torch.Tensor, token_count: torch.Tensor) -> torch.Tensor:
        """(N, T) ids, (N,) counts >= 1 -> (N, text_dim): one text per row, independent of
        the other rows (what serving caches per text and exports to ONNX)."""
        states, _ = self.gru(self.embed(token_ids))
        last = states[torch.arange(states.shape[0]), token_count - 1]
        return self.norm(last)


class TextRows(nn.Module):
    """The served function: `TextRNN.encode`, one text per row."""

    def __init__(self, network: TextRNN) -> None:
        super().__init__()
        self.network = network

    def forward(self, token_ids: torch.Tensor, token_count: torch.Tensor) -> torch.Tensor:
        return self.network.encode(token_ids, token_count)


class TextEvents(nn.Module):
    """The stage-level function (`stage.onnx`): (B, L, T) ids, (B, L) counts -> (B, L,
    text_dim), every event's text through `encode` at once and zeros where an event has no
    text. The same function as `TextRNN.forward`, without its data-dependent branch and
    boolean indexing, so that it exports with fixed shapes and runs as one GPU batch."""

    def __init__(self, network: TextRNN) -> None:
        super().__init__()
        self.network = network

    def forward(self, token_ids: torch.Tensor, token_count: torch.Tensor) -> torch.Tensor:
        dims = self.network.dims  # constants, so that the export's dims are fixed
        count = token_count.reshape(-1)
        vec = self.network.encode(token_ids.reshape(-1, dims.max_tokens), count.clamp(min=1))
        vec = vec * (count > 0).unsqueeze(-1).to(vec.dtype)
        return vec.reshape(-1, dims.max_events, dims.text_dim)
