"""text_rnn: a GRU over the word pieces of each event's text -> one vector per event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dynemb.dims import Dims
from dynemb.serving import checks
from dynemb.serving.cache import cached_rows, row_keys
from dynemb.specs import TensorSpec
from dynemb.stages.base import RunnerOptions
from dynemb.stages.torch_stage import RowCacheRunner, TorchStage
from dynemb.tensors import Tensors

if TYPE_CHECKING:
    from torch import nn

    from dynemb.manifest import Manifest


@dataclass(frozen=True)
class TextRNNParams:
    vocab_size: int = 30_522  # MiniLM's word pieces (the token embeddings start from its own)
    token_dim: int = 384


class TextRunner(RowCacheRunner):
    """Each distinct text of the batch through the runtime once, and not at all when the
    cache has it (a text's vector depends on its tokens and the weights only)."""

    cache_name = "text"

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, count = inputs["TOKEN_IDS"], inputs["TOKEN_COUNT"]
        users, events, tokens = ids.shape
        ids, count = ids.reshape(-1, tokens), count.reshape(-1)
        out = np.zeros((users * events, self.manifest.dims.text_dim), np.float32)
        real = np.flatnonzero(count > 0)  # events without text stay zeros
        if real.size:
            ids, count = ids[real], count[real]
            out[real] = cached_rows(
                row_keys(ids, count),
                lambda rows: self.runtime({"TOKEN_IDS": ids[rows], "TOKEN_COUNT": count[rows]}),
                self.cache,
            )
        return {"TEXT_VEC": out.reshape(users, events, -1)}

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        STAGE.check_inputs(self.manifest, inputs)


class TextRNNStage(TorchStage):
    name = "text_rnn"
    description = "GRU over tokens"
    params_type = TextRNNParams
    # ~0.65 kB a text with Python's overhead: about 100k texts in 64 MB.
    options = RunnerOptions(runtime="onnxruntime", cache_entries=200_000, cache_mb=64)
    row_runner = TextRunner

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        return (t.token_ids, t.token_count), (t.text_vec,)

    def network(self, dims: Dims, params: TextRNNParams) -> nn.Module:
        from dynemb.stages.text_rnn.network import TextRNN

        return TextRNN(dims, params)

    def served(self, network: nn.Module) -> nn.Module:
        from dynemb.stages.text_rnn.network import TextRows

        return TextRows(network)

    def stage_function(self, network: nn.Module) -> nn.Module:
        from dynemb.stages.text_rnn.network import TextEvents

        return TextEvents(network)

    def check_inputs(self, manifest: Manifest, inputs: dict[str, np.ndarray]) -> None:
        checks.in_range("TOKEN_IDS", inputs["TOKEN_IDS"], 0, manifest.hparams.vocab_size)
        checks.in_range("TOKEN_COUNT", inputs["TOKEN_COUNT"], 0, manifest.dims.max_tokens + 1)

    def example_inputs(self, dims: Dims) -> dict[str, np.ndarray]:
        ids = np.ones((2, dims.max_tokens), np.int64)
        return {"TOKEN_IDS": ids, "TOKEN_COUNT": np.array([dims.max_tokens, 1], np.int64)}


STAGE = TextRNNStage()
