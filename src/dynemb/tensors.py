"""Every tensor of the ensembles, named once: the wire tensors clients send and receive
(their names come from dynemb_client.contract) and the ones that pass between stages.

Tensor names are global inside a Triton ensemble, so a stage's spec picks its inputs and
outputs from here; a tensor's producer and its consumers then agree on dtype and shape by
construction (a unit test also checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

from dynemb.dims import Dims
from dynemb.specs import TensorSpec
from dynemb_client import contract as wire


@dataclass(frozen=True)
class Tensors:
    """The tensors for one set of dims (shapes are per user, without the batch axis)."""

    dims: Dims

    # --- wire: what a client sends ------------------------------------------------------
    @property
    def event_text(self) -> TensorSpec:
        return TensorSpec(wire.EVENT_TEXT, "BYTES", (self.dims.max_events,))

    @property
    def event_image(self) -> TensorSpec:
        return TensorSpec(wire.EVENT_IMAGE, "BYTES", (self.dims.max_events,))

    @property
    def event_labels(self) -> TensorSpec:
        return TensorSpec(wire.EVENT_LABELS, "BYTES", (self.dims.max_events, self.dims.max_labels))

    @property
    def event_time(self) -> TensorSpec:
        return TensorSpec(wire.EVENT_TIME, "FP64", (self.dims.max_events,))

    @property
    def event_count(self) -> TensorSpec:
        return TensorSpec(wire.EVENT_COUNT, "INT32", (1,))

    @property
    def query_time(self) -> TensorSpec:
        return TensorSpec(wire.QUERY_TIME, "FP64", (1,))

    @property
    def top_k(self) -> TensorSpec:
        return TensorSpec(wire.TOP_K, "INT32", (1,))

    # --- between stages -----------------------------------------------------------------
    @property
    def token_ids(self) -> TensorSpec:
        return TensorSpec("TOKEN_IDS", "INT64", (self.dims.max_events, self.dims.max_tokens))

    @property
    def token_count(self) -> TensorSpec:
        return TensorSpec("TOKEN_COUNT", "INT64", (self.dims.max_events,))

    @property
    def image_pixels(self) -> TensorSpec:
        s = self.dims.image_size
        return TensorSpec("IMAGE_PIXELS", "UINT8", (self.dims.max_events, 3, s, s))

    @property
    def image_mask(self) -> TensorSpec:
        return TensorSpec("IMAGE_MASK", "BOOL", (self.dims.max_events,))

    @property
    def label_ids(self) -> TensorSpec:
        return TensorSpec("LABEL_IDS", "INT64", (self.dims.max_events, self.dims.max_labels))

    @property
    def time_features(self) -> TensorSpec:
        return TensorSpec("TIME_FEATURES", "FP32", (self.dims.max_events, self.dims.time_dim))

    @property
    def query_features(self) -> TensorSpec:
        return TensorSpec("QUERY_FEATURES", "FP32", (self.dims.query_dim,))

    @property
    def event_mask(self) -> TensorSpec:
        return TensorSpec("EVENT_MASK", "BOOL", (self.dims.max_events,))

    @property
    def text_vec(self) -> TensorSpec:
        return TensorSpec("TEXT_VEC", "FP32", (self.dims.max_events, self.dims.text_dim))

    @property
    def image_vec(self) -> TensorSpec:
        return TensorSpec("IMAGE_VEC", "FP32", (self.dims.max_events, self.dims.image_dim))

    @property
    def label_vec(self) -> TensorSpec:
        return TensorSpec("LABEL_VEC", "FP32", (self.dims.max_events, self.dims.label_dim))

    @property
    def seq_features(self) -> TensorSpec:
        return TensorSpec("SEQ_FEATURES", "FP32", (self.dims.max_events, self.dims.seq_dim))

    # --- wire: what a client receives ---------------------------------------------------
    @property
    def user_embedding(self) -> TensorSpec:
        return TensorSpec(wire.USER_EMBEDDING, "FP32", (self.dims.embed_dim,))

    @property
    def item_ids(self) -> TensorSpec:
        return TensorSpec(wire.ITEM_IDS, "BYTES", (-1,))

    @property
    def item_scores(self) -> TensorSpec:
        return TensorSpec(wire.ITEM_SCORES, "FP32", (-1,))

    @property
    def item_titles(self) -> TensorSpec:
        return TensorSpec(wire.ITEM_TITLES, "BYTES", (-1,))
