"""Synthetic data: determinism, image signal per category, masking rate, interest drift."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import random
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dynemb.data.synthetic import (
    PAINTERS,
    STYLES,
    SyntheticConfig,
    SyntheticData,
    _geometric,
    draw_item_image,
    generate,
)

SMALL = SyntheticConfig(n_categories=3, items_per_category=5, n_users=8, events_per_user=(10, 20))


@pytest.fixture(scope="module")
def default_data() -> SyntheticData:
    return generate(SyntheticConfig())


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def test_same_seed_same_bytes_other_seed_differs() -> None:
    first, second = generate(SMALL), generate(SMALL)
    assert first.dataset.items == second.dataset.items  # includes PNG bytes
    assert first.dataset.interactions == second.dataset.interactions
    assert first.interest == second.interest
    assert first.change_points == second.change_points
    other = generate(dataclasses.replace(SMALL, seed=1))
    assert other.dataset.interactions != first.dataset.interactions
    assert [i.image for i in other.dataset.items.values()] != [
        i.image for i in first.dataset.items.values()
    ]


def test_labelled_synthetic_and_shapes(default_data: SyntheticData) -> None:
    data = default_data.dataset
    config = SyntheticConfig()
    assert data.name == "synthetic" and data.synthetic
    assert len(data.items) == config.n_categories * config.items_per_category
    users = data.by_user()
    assert len(users) == config.n_users
    low, high = config.events_per_user
    assert all(low <= len(events) <= high for events in users.values())
    assert "syn-00012" in data.items
    for events in users.values():
        times = [e.time for e in events]
        assert all(b > a for a, b in itertools.pairwise(times))
        assert times[0] >= config.start_time


def test_item_text_and_labels(default_data: SyntheticData) -> None:
    item = default_data.dataset.items["syn-00000"]
    category = default_data.item_category["syn-00000"]
    assert item.labels[0] == f"category:c{category}"
    assert item.labels[1].startswith("style:")
    assert item.labels[1].removeprefix("style:") == item.title.split()[0].lower()
    assert "#" in item.title
    # Text is informative: most titles of a category use its colour words.
    for c, style in enumerate(STYLES[:6]):
        titles = [
            i.title
            for i in default_data.dataset.items.values()
            if default_data.item_category[i.item_id] == c
        ]
        share = sum(t.split()[0] in style.adjectives for t in titles) / len(titles)
        assert 0.5 < share < 1.0


def test_every_style_has_a_distinct_painter() -> None:
    shapes = [style.shape for style in STYLES]
    assert len(set(shapes)) == len(shapes) and set(shapes) == set(PAINTERS)


def test_images_differ_by_category() -> None:
    rng = random.Random(3)
    means = np.array(
        [
            np.mean([decode(draw_item_image(c, rng, 32)).mean(axis=(0, 1)) for _ in range(10)], 0)
            for c in range(len(STYLES))
        ]
    )
    for a in range(len(STYLES)):
        for b in range(a + 1, len(STYLES)):
            assert np.abs(means[a] - means[b]).max() > 10, (a, b)


def test_draw_item_image_size_jitter_and_numpy_rng() -> None:
    image = Image.open(io.BytesIO(draw_item_image(0, np.random.default_rng(0), 24)))
    assert image.format == "PNG" and image.size == (24, 24) and image.mode == "RGB"
    rng = random.Random(0)
    assert draw_item_image(1, rng, 32) != draw_item_image(1, rng, 32)
    with pytest.raises(ValueError, match="category"):
        draw_item_image(len(STYLES), rng, 32)


def test_about_fifteen_percent_of_events_lack_an_image(default_data: SyntheticData) -> None:
    events = default_data.dataset.interactions
    missing = sum(e.image is None for e in events) / len(events)
    assert 0.13 < missing < 0.17
    items = default_data.dataset.items
    assert all(e.image == items[e.item_id].image for e in events if e.image is not None)


def test_events_follow_interest(default_data: SyntheticData) -> None:
    hits = total = 0
    for user, events in default_data.dataset.by_user().items():
        interest = default_data.interest[user]
        assert len(interest) == len(events)
        for event, category in zip(events, interest, strict=True):
            hits += default_data.item_category[event.item_id] == category
            total += 1
            assert event.labels[-1] == "action:view" and event.rating is None
            assert event.text == default_data.dataset.items[event.item_id].title
    expected = 0.85 + 0.15 / 6
    assert abs(hits / total - expected) < 0.02


def test_change_points_are_exactly_the_interest_changes(default_data: SyntheticData) -> None:
    n_changes = 0
    for user, interest in default_data.interest.items():
        changes = [i for i in range(1, len(interest)) if interest[i] != interest[i - 1]]
        assert default_data.change_points[user] == changes
        n_changes += len(changes)
    n_events = sum(len(v) for v in default_data.interest.values())
    # Roughly one change per mean_segment_len events.
    assert 0.06 < n_changes / n_events < 0.1


def test_geometric_mean() -> None:
    rng = random.Random(0)
    draws = [_geometric(rng, 12.0) for _ in range(20_000)]
    assert min(draws) >= 1
    assert abs(statistics.mean(draws) - 12.0) < 0.5
    assert _geometric(rng, 1.0) == 1


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_categories": 1},
        {"n_categories": 99},
        {"events_per_user": (5, 2)},
        {"image_missing_prob": 1.5},
    ],
)
def test_config_validation(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SyntheticConfig(**overrides)  # type: ignore[arg-type]


def test_deterministic_across_processes() -> None:
    """Hash randomisation or set order must not leak into the data (fresh interpreters)."""
    script = (
        "import hashlib; from dynemb.data.synthetic import SyntheticConfig, generate;"
        "d = generate(SyntheticConfig(n_categories=3, items_per_category=4, n_users=5)).dataset;"
        "h = hashlib.sha256();"
        "[h.update(repr((e.user_id, e.item_id, e.time, e.text, e.labels, e.image)).encode())"
        " for e in d.interactions];"
        "print(h.hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1
