"""Typed stage specs: the single source of truth for every Triton model's tensors.

The committed `config.pbtxt` files are generated from these specs (dynemb.pbtxt), the
ensembles' wiring is derived from them (tensor names are global inside an ensemble), and
the Python-backend adapters validate requests against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynemb.config import DIMS, Dims
from dynemb_client import contract as wire

# Triton data types <-> numpy. BYTES travels as numpy object arrays of bytes.
NUMPY_DTYPES: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of NUMPY_DTYPES
    dims: tuple[int, ...]  # per-user shape, without the batch dimension; -1 = variable

    def __post_init__(self) -> None:
        if self.dtype not in NUMPY_DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype}")

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.dtype]


@dataclass(frozen=True)
class StageSpec:
    """One Triton model served by the Python backend, batched over users."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 32
    instances: int = 1
    max_queue_delay_us: int = 200
    description: str = ""

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    @property
    def signature(self) -> dict[str, list[list]]:
        """JSON-friendly signature, stored in each version's manifest and compared on swap."""
        return {
            "inputs": [[t.name, t.dtype, list(t.dims)] for t in self.inputs],
            "outputs": [[t.name, t.dtype, list(t.dims)] for t in self.outputs],
        }


@dataclass(frozen=True)
class EnsembleSpec:
    name: str
    steps: tuple[str, ...]  # stage names in execution order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 32


def stage_specs(dims: Dims = DIMS) -> dict[str, StageSpec]:
    """Every stage of the pipeline, in execution order."""
    n, t, m, s = dims.max_events, dims.max_tokens, dims.max_labels, dims.image_size
    text = TensorSpec(wire.EVENT_TEXT, "BYTES", (n,))
    image = TensorSpec(wire.EVENT_IMAGE, "BYTES", (n,))
    labels = TensorSpec(wire.EVENT_LABELS, "BYTES", (n, m))
    times = TensorSpec(wire.EVENT_TIME, "FP64", (n,))
    count = TensorSpec(wire.EVENT_COUNT, "INT32", (1,))
    query = TensorSpec(wire.QUERY_TIME, "FP64", (1,))
    top_k = TensorSpec(wire.TOP_K, "INT32", (1,))

    token_ids = TensorSpec("TOKEN_IDS", "INT64", (n, t))
    token_count = TensorSpec("TOKEN_COUNT", "INT64", (n,))
    pixels = TensorSpec("IMAGE_PIXELS", "UINT8", (n, 3, s, s))
    image_mask = TensorSpec("IMAGE_MASK", "BOOL", (n,))
    label_ids = TensorSpec("LABEL_IDS", "INT64", (n, m))
    time_features = TensorSpec("TIME_FEATURES", "FP32", (n, dims.time_dim))
    query_features = TensorSpec("QUERY_FEATURES", "FP32", (dims.query_dim,))
    event_mask = TensorSpec("EVENT_MASK", "BOOL", (n,))
    text_vec = TensorSpec("TEXT_VEC", "FP32", (n, dims.text_dim))
    image_vec = TensorSpec("IMAGE_VEC", "FP32", (n, dims.image_dim))
    label_vec = TensorSpec("LABEL_VEC", "FP32", (n, dims.label_dim))
    seq = TensorSpec("SEQ_FEATURES", "FP32", (n, dims.seq_dim))
    embedding = TensorSpec(wire.USER_EMBEDDING, "FP32", (dims.embed_dim,))

    specs = [
        StageSpec(
            "preprocess",
            inputs=(text, image, labels, times, count, query),
            outputs=(
                token_ids,
                token_count,
                pixels,
                image_mask,
                label_ids,
                time_features,
                query_features,
                event_mask,
            ),
            description="tokenise, decode images, map labels, time and window features",
        ),
        StageSpec("text_rnn", (token_ids, token_count), (text_vec,), description="GRU over tokens"),
        StageSpec("image_cnn", (pixels, image_mask), (image_vec,), description="CNN, masked"),
        StageSpec("label_mlp", (label_ids,), (label_vec,), description="embedding-bag + MLP"),
        StageSpec(
            "temporal_lstm",
            (text_vec, image_vec, label_vec, time_features, event_mask),
            (seq,),
            description="LSTM over events -> F_t",
        ),
        StageSpec(
            "llm_encoder",
            (seq, text_vec, image_vec, label_vec, event_mask, query_features),
            (embedding,),
            description="MiniLM over [F_t ⊕ G] soft tokens -> E_t",
        ),
        StageSpec(
            "retrieve",
            (embedding, top_k),
            (
                TensorSpec(wire.ITEM_IDS, "BYTES", (-1,)),
                TensorSpec(wire.ITEM_SCORES, "FP32", (-1,)),
                TensorSpec(wire.ITEM_TITLES, "BYTES", (-1,)),
            ),
            description="cosine top-K over the item table",
        ),
    ]
    return {spec.name: spec for spec in specs}


def ensemble_specs(dims: Dims = DIMS) -> dict[str, EnsembleSpec]:
    """The two ensembles; their steps and tensors come from the stage specs."""
    stages = stage_specs(dims)
    interest_steps = ("preprocess", "text_rnn", "image_cnn", "label_mlp", "temporal_lstm")
    interest_steps += ("llm_encoder",)
    pre = stages["preprocess"]
    retrieve = stages["retrieve"]
    return {
        wire.USER_INTEREST: EnsembleSpec(
            wire.USER_INTEREST,
            interest_steps,
            inputs=pre.inputs,
            outputs=stages["llm_encoder"].outputs,
        ),
        wire.RECOMMEND: EnsembleSpec(
            wire.RECOMMEND,
            (*interest_steps, "retrieve"),
            inputs=(*pre.inputs, retrieve.input(wire.TOP_K)),
            # USER_EMBEDDING is internal here: an ensemble output that a later step also
            # consumes deadlocks Triton 2.51 when a client requests only the other outputs.
            outputs=retrieve.outputs,
        ),
    }


STAGES = stage_specs()
ENSEMBLES = ensemble_specs()
