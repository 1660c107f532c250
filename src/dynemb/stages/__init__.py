"""The torch stage networks, one per file, and the explicit registry the loaders use.

Each entry imports its module when called: a stage's server process then imports only
what it runs (transformers only in llm_encoder), which keeps seven processes' start-up
cheap on two cores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def _text_rnn() -> type[nn.Module]:
    from dynemb.stages.text_rnn import TextRNN

    return TextRNN


def _image_cnn() -> type[nn.Module]:
    from dynemb.stages.image_cnn import ImageCNN

    return ImageCNN


def _label_mlp() -> type[nn.Module]:
    from dynemb.stages.label_mlp import LabelMLP

    return LabelMLP


def _temporal_lstm() -> type[nn.Module]:
    from dynemb.stages.temporal_lstm import TemporalLSTM

    return TemporalLSTM


def _llm_encoder() -> type[nn.Module]:
    from dynemb.stages.llm_encoder import LLMEncoder

    return LLMEncoder


TORCH_STAGES: dict[str, Callable[[], type[nn.Module]]] = {
    "text_rnn": _text_rnn,
    "image_cnn": _image_cnn,
    "label_mlp": _label_mlp,
    "temporal_lstm": _temporal_lstm,
    "llm_encoder": _llm_encoder,
}
