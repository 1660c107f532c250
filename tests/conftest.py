"""Shared fixtures: small preprocess assets and images, no server."""

from __future__ import annotations

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def assets():
    from dynemb.dims import DIMS
    from dynemb.stages.llm_encoder import tokenizer_json
    from dynemb.stages.preprocess.features import PreprocessAssets, build_label_vocab

    labels = build_label_vocab(
        ["genre:Comedy", "genre:Drama", "rating:4", "rating:5", "category:c1"]
    )
    return PreprocessAssets(DIMS, labels, tokenizer_json())


@pytest.fixture(scope="session")
def png() -> bytes:
    from dynemb.data.synthetic import draw_item_image

    return draw_item_image(1, random.Random(0), 32)
