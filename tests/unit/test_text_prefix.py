"""A long text is tokenised from a prefix cut at whitespace: the same first T word pieces
as the whole text, for any text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynemb.pipeline import latest_version
from dynemb.stages import load_runner
from dynemb.stages.preprocess.features import TOKENISED_CHARS_PER_PIECE, text_prefix

WORDS = st.sampled_from(
    ["the", "Toy", "Story", "(1995)", "naïve", "café", "東京", "don't", "x" * 120, "", "!!", "é"]
)
SPACES = st.sampled_from([" ", "  ", "\t", "\n", "\r\n", " " * 300, "\u00a0", "\u3000"])


@pytest.fixture(scope="module")
def preprocessor(repo):
    return load_runner(latest_version(repo / "preprocess")).preprocessor


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parts=st.lists(st.tuples(WORDS, SPACES), max_size=120))
def test_the_first_word_pieces_are_the_whole_text_s(preprocessor, parts):
    text = "".join(word + space for word, space in parts)
    t = preprocessor.dims.max_tokens
    ids, counts = preprocessor.tokens([text], 1)
    whole = preprocessor.tokenizer.encode(text, add_special_tokens=False).ids[:t]
    assert counts[0] == len(whole)
    np.testing.assert_array_equal(ids[0, : len(whole)], whole)


def test_a_long_text_is_cut_at_whitespace_after_the_limit():
    chars = TOKENISED_CHARS_PER_PIECE
    assert text_prefix("short", chars) == "short"
    text = "a" * (chars - 1) + " bc de"
    assert text_prefix(text, chars) == "a" * (chars - 1) + " bc"
    assert text_prefix("a" * (chars * 3), chars) == "a" * (chars * 3)  # nowhere to cut


def test_a_64_kb_text_is_not_tokenised_whole(preprocessor, monkeypatch):
    seen: list[int] = []
    real = preprocessor.tokenizer

    class Recording:
        def encode_batch(self, texts, **kwargs):
            seen.extend(len(text) for text in texts)
            return real.encode_batch(texts, **kwargs)

        def encode(self, text, **kwargs):
            seen.append(len(text))
            return real.encode(text, **kwargs)

    monkeypatch.setattr(preprocessor, "tokenizer", Recording())
    text = "a fine long description of the item " * 1800  # about 64 kB
    _, counts = preprocessor.tokens([text], 1)
    assert counts[0] == preprocessor.dims.max_tokens
    assert max(seen) < 2 * TOKENISED_CHARS_PER_PIECE * preprocessor.dims.max_tokens
