"""text_rnn: a GRU over the word pieces of each event's text -> one vector per event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dynemb.dims import Dims
from dynemb.specs import TensorSpec
from dynemb.stages.torch_stage import TorchStage
from dynemb.tensors import Tensors

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class TextRNNParams:
    vocab_size: int = 30_522  # MiniLM's word pieces (the token embeddings start from its own)
    token_dim: int = 384


class TextRNNStage(TorchStage):
    name = "text_rnn"
    description = "GRU over tokens"
    params_type = TextRNNParams

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return (t.token_ids, t.token_count), (t.text_vec,)

    def network(self, dims: Dims, params: TextRNNParams) -> nn.Module:
        from dynemb.stages.text_rnn.network import TextRNN

        return TextRNN(dims, params)


STAGE = TextRNNStage()
