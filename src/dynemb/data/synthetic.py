"""A seeded synthetic multimodal data set whose ground truth is known.

MovieLens has no images and its users' interests are unobserved. Here every item has a drawn
picture, a templated title and labels tied to its category, and every user follows a hidden
interest that jumps between categories at recorded change points, so tests and benchmarks
can check that the image branch carries signal and that the embedding follows the drift.
Everything it produces is labelled synthetic; its numbers never stand for real behaviour.
"""

from __future__ import annotations

import io
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from PIL import Image, ImageDraw

from dynemb.data.types import Dataset, Interaction, Item

logger = logging.getLogger(__name__)


class Rng(Protocol):
    """What the drawing needs from a generator: `random.Random` and numpy's `Generator` fit."""

    def random(self) -> float: ...

    def uniform(self, low: float, high: float) -> float: ...


@dataclass(frozen=True)
class _Style:
    shape: str
    colour: tuple[int, int, int]  # centre of the category's palette
    adjectives: tuple[str, ...]  # colour words tied to the category


# One style per category: distinct hue and distinct shape, so either cue identifies it.
STYLES: tuple[_Style, ...] = (
    _Style("circle", (205, 40, 45), ("Crimson", "Scarlet", "Ruby")),
    _Style("square", (40, 80, 200), ("Cobalt", "Navy", "Sapphire")),
    _Style("triangle", (40, 165, 60), ("Emerald", "Jade", "Moss")),
    _Style("cross", (235, 190, 30), ("Amber", "Golden", "Mustard")),
    _Style("stripes", (135, 50, 170), ("Violet", "Plum", "Amethyst")),
    _Style("ring", (30, 175, 185), ("Teal", "Turquoise", "Aqua")),
    _Style("diamond", (240, 120, 30), ("Tangerine", "Copper", "Rust")),
    _Style("dots", (90, 90, 90), ("Graphite", "Slate", "Charcoal")),
)
# Shared filler words: they appear in every category, so they carry no signal.
FILLER_ADJECTIVES = ("Classic", "Modern", "Vintage", "Deluxe", "Compact", "Handmade")
NOUNS = ("lamp", "mug", "poster", "cushion", "vase", "clock", "notebook", "scarf", "tote")


@dataclass(frozen=True)
class SyntheticConfig:
    n_categories: int = 6
    items_per_category: int = 40
    n_users: int = 300
    events_per_user: tuple[int, int] = (40, 80)  # inclusive range, drawn per user
    mean_segment_len: float = 12.0  # events between interest change points (geometric)
    on_interest_prob: float = 0.85  # else the event's item is drawn from all items
    image_missing_prob: float = 0.15  # events without an image exercise masking
    image_size: int = 32
    seed: int = 0
    start_time: int = 1_600_000_000
    start_spread_s: int = 30 * 86_400  # users start uniformly within this span
    gap_median_s: float = 3 * 3_600.0  # gaps between events are log-normal around this
    gap_sigma: float = 1.0

    def __post_init__(self) -> None:
        if not 2 <= self.n_categories <= len(STYLES):
            raise ValueError(f"n_categories must be in [2, {len(STYLES)}]")
        low, high = self.events_per_user
        if not 1 <= low <= high:
            raise ValueError("events_per_user must be (low, high) with 1 <= low <= high")
        if self.items_per_category < 1 or self.n_users < 1 or self.image_size < 8:
            raise ValueError("need items_per_category >= 1, n_users >= 1, image_size >= 8")
        if self.mean_segment_len < 1:
            raise ValueError("mean_segment_len must be >= 1")
        for name in ("on_interest_prob", "image_missing_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability")


@dataclass
class SyntheticData:
    """The data set plus its hidden ground truth, aligned with `dataset.by_user()`."""

    dataset: Dataset
    interest: dict[str, list[int]]  # per user, the interest category of each event
    change_points: dict[str, list[int]]  # per user, event indices where interest changed
    item_category: dict[str, int]


@dataclass(frozen=True)
class _Shape:
    """Where and how large one drawn shape is, in pixels."""

    cx: float
    cy: float
    radius: float
    width: float  # stroke / bar width
    offset: float  # phase of repeating patterns
    size: int

    @property
    def box(self) -> tuple[float, float, float, float]:
        r = self.radius
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)


Colour = tuple[int, int, int]


def _circle(draw: ImageDraw.ImageDraw, s: _Shape, colour: Colour) -> None:
    draw.ellipse(s.box, fill=colour)


def _square(draw: ImageDraw.ImageDraw, s: _Shape, colour: Colour) -> None:
    draw.rectangle(s.box, fill=colour)


def _triangle(draw: ImageDraw.ImageDraw, s: _Shape, colour: Colour) -> None:
    r = s.radius
    draw.polygon([(s.cx, s.cy - r), (s.cx + r, s.cy + r), (s.cx - r, s.cy + r)], fill=colour)


def _cross(draw: ImageDraw.ImageDraw, s: _Shape, colour: Colour) -> None:
    r, w = s.radius, s.width
    draw.rectangle((s.cx - r, s.cy - w, s.cx + r, s.cy + w), fill=colour)
    draw.rectangle((s.cx - w, s.cy - r, s.cx + w, s.cy + r), fill=colour)


def _stripes(draw: ImageDraw.ImageDraw, s: _Shape, colour: Colour) -> None:
    period = 2 * s.width
    top = s.offset * period - period
    while top < s.size:
        draw.rectangle((0, top, s.size, top + s.width - 1), fill=colour)
        top += period


def _ring(draw: ImageDraw.ImageDraw, s: _Shape, colour: Colour) -> None:
    draw.ellipse(s.box, outline=colour, width=round(s.width))


def _diamond(draw: ImageDraw.ImageDraw, s: _Shape, colour: Colour) -> None:
    r = s.radius
    draw.polygon(
        [(s.cx, s.cy - r), (s.cx + r, s.cy), (s.cx, s.cy + r), (s.cx - r, s.cy)], fill=colour
    )


def _dots(draw: ImageDraw.ImageDraw, s: _Shape, colour: Colour) -> None:
    dot, step = max(1.5, s.radius / 4), s.radius / 2
    for x in (s.cx - step, s.cx + step):
        for y in (s.cy - step, s.cy + step):
            draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=colour)


PAINTERS: dict[str, Callable[[ImageDraw.ImageDraw, _Shape, Colour], None]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "stripes": _stripes,
    "ring": _ring,
    "diamond": _diamond,
    "dots": _dots,
}


def draw_item_image(category: int, rng: Rng, size: int = 32) -> bytes:
    """PNG of the category's shape in its palette, with jittered position, size and colour."""
    if not 0 <= category < len(STYLES):
        raise ValueError(f"category must be in [0, {len(STYLES)}), got {category}")
    style = STYLES[category]
    red, green, blue = (max(0, min(255, round(c + rng.uniform(-25, 25)))) for c in style.colour)
    grey = round(rng.uniform(215, 245))
    radius = rng.uniform(0.28, 0.42) * size
    shape = _Shape(
        cx=size / 2 + rng.uniform(-0.12, 0.12) * size,
        cy=size / 2 + rng.uniform(-0.12, 0.12) * size,
        radius=radius,
        width=max(2.0, round(radius / 3)),
        offset=rng.random(),
        size=size,
    )
    image = Image.new("RGB", (size, size), (grey, grey, grey))
    PAINTERS[style.shape](ImageDraw.Draw(image), shape, (red, green, blue))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(config: SyntheticConfig | None = None) -> SyntheticData:
    """Build items and users; the same config (seed included) gives the same bytes."""
    config = config or SyntheticConfig()
    item_rng = random.Random(f"dynemb-synthetic-items-{config.seed}")
    user_rng = random.Random(f"dynemb-synthetic-users-{config.seed}")
    items, by_category = _make_items(config, item_rng)
    all_items = [item for members in by_category for item in members]
    item_category = {
        item.item_id: category for category, members in enumerate(by_category) for item in members
    }

    interactions: list[Interaction] = []
    interest: dict[str, list[int]] = {}
    change_points: dict[str, list[int]] = {}
    width = len(str(config.n_users))
    for u in range(config.n_users):
        user_id = f"syn-user-{u:0{width}d}"
        events, interest[user_id], change_points[user_id] = _make_user(
            user_id, config, user_rng, by_category, all_items
        )
        interactions.extend(events)
    interactions.sort(key=lambda event: (event.user_id, event.time))  # already so; stable
    logger.info(
        "synthetic: %d items, %d users, %d interactions (seed %d)",
        len(items),
        config.n_users,
        len(interactions),
        config.seed,
    )
    dataset = Dataset(
        name="synthetic",
        items=items,
        interactions=interactions,
        synthetic=True,
        meta={
            "source": "dynemb.data.synthetic: seeded generator, not real behaviour",
            "seed": str(config.seed),
            "config": repr(config),
        },
    )
    return SyntheticData(dataset, interest, change_points, item_category)


def _make_items(
    config: SyntheticConfig, rng: random.Random
) -> tuple[dict[str, Item], list[list[Item]]]:
    items: dict[str, Item] = {}
    by_category: list[list[Item]] = []
    for category in range(config.n_categories):
        style = STYLES[category]
        members = []
        for _ in range(config.items_per_category):
            # Informative but noisy text: the colour word is usually the category's,
            # the shape word usually present, the noun and number never informative.
            use_colour = rng.random() < 0.75
            pool = style.adjectives if use_colour else FILLER_ADJECTIVES
            adjective = rng.choice(pool)
            words = [adjective]
            if rng.random() < 0.7:
                words.append(style.shape)
            words.append(rng.choice(NOUNS))
            words.append(f"#{rng.randint(1, 99)}")
            item = Item(
                item_id=f"syn-{len(items):05d}",
                title=" ".join(words),
                labels=(f"category:c{category}", f"style:{adjective.lower()}"),
                image=draw_item_image(category, rng, config.image_size),
            )
            items[item.item_id] = item
            members.append(item)
        by_category.append(members)
    return items, by_category


def _make_user(
    user_id: str,
    config: SyntheticConfig,
    rng: random.Random,
    by_category: list[list[Item]],
    all_items: list[Item],
) -> tuple[list[Interaction], list[int], list[int]]:
    n_events = rng.randint(*config.events_per_user)
    current = rng.randrange(config.n_categories)
    left = _geometric(rng, config.mean_segment_len)
    time = config.start_time + round(rng.uniform(0, config.start_spread_s))
    events: list[Interaction] = []
    interest: list[int] = []
    changes: list[int] = []
    for index in range(n_events):
        if left == 0:
            current = (current + rng.randrange(1, config.n_categories)) % config.n_categories
            left = _geometric(rng, config.mean_segment_len)
            changes.append(index)
        left -= 1
        if index:
            gap = rng.lognormvariate(math.log(config.gap_median_s), config.gap_sigma)
            time += max(1, round(gap))
        if rng.random() < config.on_interest_prob:
            item = rng.choice(by_category[current])
        else:
            item = rng.choice(all_items)
        image = None if rng.random() < config.image_missing_prob else item.image
        events.append(
            Interaction(
                user_id=user_id,
                item_id=item.item_id,
                time=float(time),
                text=item.title,
                labels=(*item.labels, "action:view"),
                image=image,
            )
        )
        interest.append(current)
    return events, interest, changes


def _geometric(rng: random.Random, mean: float) -> int:
    """Number of trials to the first success, p = 1/mean (support 1, 2, ...)."""
    if mean <= 1:
        return 1
    return 1 + int(math.log(1.0 - rng.random()) / math.log(1.0 - 1.0 / mean))
