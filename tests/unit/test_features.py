"""Preprocessing: shapes, masks, time features by hand, and errors that name the field."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from dynemb.dims import DIMS
from dynemb.errors import InputError
from dynemb.stages.preprocess.features import (
    UNK_LABEL,
    Preprocessor,
    query_features,
    time_features,
)
from dynemb_client import Event, build_inputs

T0 = 1_700_000_000.0
DDS = b"DDS " + struct.pack("<7I", 124, 0x1007, 16, 16, 0, 0, 0) + b"\0" * 100


def one_user(events, at=None):
    x = build_inputs([events], [at], DIMS.max_events, DIMS.max_labels)
    return {k: v[0] for k, v in x.items()}


@pytest.fixture(scope="module")
def pre(assets):
    return Preprocessor(assets)


def test_shapes_and_masks(pre, png):
    events = [
        Event(T0, "a comedy", png, ["genre:Comedy", "rating:4"]),
        Event(T0 + 60, "no image", None, ["genre:Drama", "brand:new"]),
    ]
    out = pre.user(one_user(events))
    assert out["EVENT_MASK"].tolist() == [True, True] + [False] * (DIMS.max_events - 2)
    assert out["IMAGE_MASK"][:3].tolist() == [True, False, False]
    assert out["IMAGE_PIXELS"].shape == (DIMS.max_events, 3, 32, 32)
    assert out["IMAGE_PIXELS"][0].max() > 0 and out["IMAGE_PIXELS"][1].max() == 0
    assert out["TOKEN_COUNT"][0] > 0 and out["TOKEN_COUNT"][2] == 0
    assert out["LABEL_IDS"][1, 1] == UNK_LABEL  # "brand:new" is not in the vocabulary
    assert out["LABEL_IDS"][2].sum() == 0
    assert out["TIME_FEATURES"].shape == (DIMS.max_events, DIMS.time_dim)
    assert not out["TIME_FEATURES"][2:].any()


def test_time_features_by_hand(pre):
    hour = 3600.0
    events = [Event(T0 + i * hour, f"e{i}", labels=["rating:4"]) for i in range(3)]
    out = pre.user(one_user(events, at=T0 + 5 * hour))
    f = out["TIME_FEATURES"]
    assert f[0, 0] == 0 and f[2, 0] == pytest.approx(math.log1p(2.0))  # since the first
    assert f[0, 1] == 0 and f[1, 1] == pytest.approx(math.log1p(1.0))
    assert f[0, 6] == 0 and f[2, 6] == pytest.approx(2 / DIMS.max_events)  # position
    # 1 h window (ages strictly below 1 h): only the event itself.
    assert f[2, 7] == pytest.approx(math.log1p(1))
    # 1 day window: all three for the newest event; mean rating 4/5; same label share 1.
    assert f[2, 10] == pytest.approx(math.log1p(3))
    assert f[2, 11] == pytest.approx(0.8)
    assert f[2, 12] == pytest.approx(1.0)
    q = out["QUERY_FEATURES"]
    assert q[0] == pytest.approx(math.log1p(3.0)) and q[5] == 1.0


def test_event_features_do_not_depend_on_t_or_later_events(pre):
    """What lets training score every prefix of a sequence in one causal pass."""
    events = [Event(T0 + i * 600.0, f"e{i}", labels=[f"g{i % 2}", "rating:3"]) for i in range(6)]
    whole = pre.user(one_user(events, at=T0 + 10 * 3600.0))["TIME_FEATURES"]
    prefix = pre.user(one_user(events[:4], at=T0 + 4 * 600.0))["TIME_FEATURES"]
    np.testing.assert_array_equal(whole[:4], prefix[:4])


def test_a_batch_is_each_user_on_their_own(pre, png):
    """Users of different lengths (one cut by its query time, one empty, one with an image)
    preprocessed together: every row is that user's alone, and the batched time and
    query features are the single-history functions' (padding never leaks across)."""
    hour = 3600.0
    users = [
        [
            Event(T0 + i * hour, f"e{i}", labels=[f"g{i % 3}", f"rating:{1 + i % 5}"])
            for i in range(7)
        ],
        [],
        [Event(T0 + 5.0, "one", png, ["genre:Comedy"])],
        [Event(T0 + 100 * i, f"f{i}", labels=["g1"]) for i in range(DIMS.max_events + 3)],
    ]
    at = [T0 + 3.5 * hour, T0, None, None]
    x = build_inputs(users, at, DIMS.max_events, DIMS.max_labels)
    batch = pre(x)
    for b in range(len(users)):
        alone = pre.user({k: v[b] for k, v in x.items()})
        for name, value in alone.items():
            np.testing.assert_array_equal(batch[name][b], value, err_msg=f"user {b} {name}")
        n = int(alone["EVENT_MASK"].sum())
        times = x["EVENT_TIME"][b, :n]
        labels = [[v.decode() for v in row if v] for row in x["EVENT_LABELS"][b, :n]]
        query = float(x["QUERY_TIME"][b, 0])
        np.testing.assert_allclose(
            batch["TIME_FEATURES"][b, :n], time_features(times, labels, DIMS)[:n], atol=1e-6
        )
        assert not batch["TIME_FEATURES"][b, n:].any()
        np.testing.assert_allclose(
            batch["QUERY_FEATURES"][b], query_features(times, query, DIMS), atol=1e-6
        )
    assert batch["EVENT_MASK"].sum(1).tolist() == [4, 0, 1, DIMS.max_events]


def test_events_after_query_time_are_ignored(pre):
    events = [Event(T0 + i, f"e{i}") for i in range(4)]
    out = pre.user(one_user(events, at=T0 + 4))
    x = one_user(events, at=T0 + 4)
    x["QUERY_TIME"][0] = T0 + 1.5  # the client would drop them; the server must too
    out = pre.user(x)
    assert out["EVENT_MASK"].sum() == 2


def test_empty_history(pre):
    out = pre.user(one_user([], at=T0))
    assert not out["EVENT_MASK"].any()
    assert np.isfinite(out["QUERY_FEATURES"]).all() and out["QUERY_FEATURES"][5] == 0


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda x: x["EVENT_TEXT"].__setitem__(1, b"\xff\xfe"), "EVENT_TEXT[1]"),
        (lambda x: x["EVENT_IMAGE"].__setitem__(0, b"\x89PNG\r\n\x1a\nbroken"), "EVENT_IMAGE[0]"),
        (lambda x: x["EVENT_TIME"].__setitem__(0, -5.0), "EVENT_TIME[0]"),
        (lambda x: x["EVENT_TIME"].__setitem__(1, 1e300), "EVENT_TIME[1]"),
        (lambda x: x["EVENT_TIME"].__setitem__(1, T0 - 100), "EVENT_TIME[1]"),
        (lambda x: x["QUERY_TIME"].__setitem__(0, math.nan), "QUERY_TIME"),
        (lambda x: x["EVENT_COUNT"].__setitem__(0, 51), "EVENT_COUNT"),
        (lambda x: x["EVENT_LABELS"].__setitem__((0, 0), b"\xc3"), "EVENT_LABELS[0][0]"),
        # A DDS header PIL's plugin refuses with NotImplementedError: was INTERNAL.
        (lambda x: x["EVENT_IMAGE"].__setitem__(0, DDS), "EVENT_IMAGE[0]"),
    ],
)
def test_bad_input_names_the_field(pre, png, mutate, field):
    x = one_user([Event(T0, "ok", png, ["genre:Comedy"]), Event(T0 + 1, "ok too")])
    mutate(x)
    with pytest.raises(InputError) as info:
        pre.user(x)
    assert info.value.field == field
    assert field in str(info.value)


def test_batch_equals_single(pre, png):
    users = [[Event(T0 + i, f"t{i}", png if i % 2 else None) for i in range(n)] for n in (0, 3, 7)]
    x = build_inputs(users, [None] * 3, DIMS.max_events, DIMS.max_labels)
    batch = pre(x)
    for i in range(3):
        single = pre.user({k: v[i] for k, v in x.items()})
        for key, value in single.items():
            np.testing.assert_array_equal(batch[key][i], value)


def test_first_label_shares_are_the_same_for_a_few_rows_and_for_all():
    import random

    from dynemb.stages.preprocess.features import _shares_first_label

    rng = random.Random(0)
    for _ in range(100):
        n = rng.randrange(1, 51)
        pool = ["", "l1", "l2", "l3", "l4"]  # "" is a label like any other here
        labels = [[rng.choice(pool) for _ in range(rng.randrange(0, 4))] for _ in range(n)]
        full = _shares_first_label(labels, 0)  # the vectorised path
        for first in range(n):  # the last rows take the direct path
            np.testing.assert_array_equal(_shares_first_label(labels, first), full[first:])


def test_a_batch_of_histories_gets_each_one_s_own_time_and_query_features():
    """The session engine computes a whole batch's features in one pass over padded
    histories: each must equal that history's features alone, whatever its neighbours."""
    import random

    from dynemb.stages.preprocess.features import (
        TimeRows,
        query_feature_batch,
        query_features,
        time_feature_batch,
        time_feature_rows,
    )

    rng = random.Random(7)
    gaps = (0, 60, 3_600, 86_400, 9 * 86_400, 40 * 86_400)
    histories, at = [], []
    for _ in range(40):
        n = rng.randrange(0, 55)
        times = 1.7e9 + np.cumsum([rng.choice(gaps) for _ in range(n)]).astype(np.float64)
        pool = ["genre:a", "genre:b", "rating:3", "rating:5", "rating:?"]
        labels = [rng.sample(pool, rng.randrange(3)) for _ in range(n)]
        first = rng.choice([0, max(0, n - 1), max(0, n - 4), n])
        histories.append(TimeRows(times, labels, first))
        at.append((times[-1] if n else 1.7e9) + rng.choice([0, 30, 1e6]))
    batched = time_feature_batch(histories, DIMS)
    queries = query_feature_batch([h.times for h in histories], np.array(at), DIMS)
    for h, rows, q, t in zip(histories, batched, queries, at, strict=True):
        np.testing.assert_array_equal(rows, time_feature_rows(h.times, h.labels, DIMS, h.first))
        np.testing.assert_array_equal(q, query_features(h.times, t, DIMS))
    assert sum(len(r) for r in batched) == sum(len(h.times) - h.first for h in histories)


def test_a_user_s_images_are_bounded_in_declared_pixels(assets, monkeypatch):
    """Checked from each header before decoding, and counted for cached images too (the
    answer does not depend on what the cache holds), each distinct image once (a product
    viewed again is decoded once); a catalogue's images are not one user's and are not
    held to it."""
    import io

    from PIL import Image

    from dynemb.stages.preprocess import features

    def image(shade: int) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (64, 64), (shade, 0, 0)).save(out, format="PNG")
        return out.getvalue()

    monkeypatch.setattr(features, "MAX_USER_IMAGE_PIXELS", 3 * 64 * 64)
    pre = Preprocessor(assets, features.PreprocessCaches.bounded(100, 1.0))
    three = [Event(T0 + i, f"t{i}", image(i)) for i in range(3)]
    assert pre.user(one_user(three))["IMAGE_MASK"][:3].all()
    four = [*three, Event(T0 + 3, "t3", image(3))]
    with pytest.raises(InputError, match=r"EVENT_IMAGE\[3\].*limit on a user's images"):
        pre.user(one_user(four))
    pre.user(one_user([Event(T0, "t3", image(3))]))  # image(3) is now in the cache
    with pytest.raises(InputError, match=r"EVENT_IMAGE\[3\].*declare 16384 pixels"):
        pre.user(one_user(four))  # the fourth, cached, counts as before
    again = [*three, Event(T0 + 3, "t0 again", image(0))]  # a product seen twice: once
    assert pre.user(one_user(again))["IMAGE_MASK"][:4].all()
    _, mask = pre.images([image(i) for i in range(5)], 5, keep=5, one_user=False)
    assert mask.all()


@pytest.mark.parametrize("rating", [b"rating:1e40", b"rating:-1e40", b"rating:nan", b"rating:good"])
def test_a_rating_that_is_no_number_in_range_is_unrated(pre, rating):
    """rating:1e40 overflowed the float32 mean rating: user_interest answered INTERNAL
    while the session model answered. It reads as unrated, as rating:nan did."""
    x = one_user([Event(T0, "a", None, ["genre:Comedy"]), Event(T0 + 60, "b")])
    reference = pre.user(x)["TIME_FEATURES"]
    x["EVENT_LABELS"][0, 1] = rating
    features = pre.user(x)["TIME_FEATURES"]
    assert np.isfinite(features).all()
    np.testing.assert_array_equal(features, reference)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_to_nearly_the_full_decode(monkeypatch):
    """Draft mode reads a JPEG at 1/8 of its size when that still covers 32x32: the result
    is within a few levels of decoding every pixel, and the limits still count the pixels
    the header declares, not the reduced ones."""
    import io

    from PIL import Image

    from dynemb.stages.preprocess.features import decode_image_sized

    rng = np.random.default_rng(3)
    coarse = Image.fromarray(rng.integers(0, 256, (25, 33, 3), dtype=np.uint8))
    photo = coarse.resize((1600, 1200), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    photo.save(out, format="JPEG", quality=90)
    data = out.getvalue()
    with Image.open(io.BytesIO(data)) as full:
        reference = np.asarray(
            full.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), np.int16
        ).transpose(2, 0, 1)
    from PIL import JpegImagePlugin

    read_at = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        found = draft(self, mode, size)
        read_at.append(self.size)
        return found

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    decoded, declared = decode_image_sized("EVENT_IMAGE[0]", data, 32)
    assert read_at == [(200, 150)]  # 1/8 of each side: what the decoder read
    assert declared == 1600 * 1200
    difference = np.abs(decoded.astype(np.int16) - reference)
    assert difference.mean() < 2.0 and difference.max() <= 16
    with pytest.raises(InputError, match="past what is left"):
        decode_image_sized("EVENT_IMAGE[0]", data, 32, budget=1600 * 1200 - 1)


def test_an_image_in_no_known_format_is_refused_without_an_object_address(pre):
    """PIL's message for bytes it cannot identify names a BytesIO at an address, which
    reached the caller's error."""
    x = one_user([Event(T0, "ok")])
    x["EVENT_IMAGE"][0] = b"no image format starts like this"
    with pytest.raises(InputError, match=r"EVENT_IMAGE\[0\].*no format recognised") as info:
        pre.user(x)
    assert "0x" not in str(info.value) and "BytesIO" not in str(info.value)


def _encoded(image, fmt: str, **options) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def test_images_decode_as_a_viewer_shows_them():
    """A 16-bit gray PNG was read as white, a transparent background as black, and an
    EXIF orientation was ignored."""
    from PIL import Image

    from dynemb.stages.preprocess.features import decode_image_sized

    def decoded(data: bytes) -> np.ndarray:
        return decode_image_sized("EVENT_IMAGE[0]", data, 32)[0].astype(np.int16)

    # 16-bit gray: its levels, scaled to 8 bits
    levels = np.full((64, 64), 257 * 100, np.uint16)
    assert np.abs(decoded(_encoded(Image.fromarray(levels), "PNG")) - 100).max() <= 1
    # transparent pixels over white: a red square cut out on a transparent background
    cutout = np.zeros((64, 64, 4), np.uint8)
    cutout[16:48, 16:48] = (255, 0, 0, 255)
    got = decoded(_encoded(Image.fromarray(cutout, "RGBA"), "PNG"))
    assert (got[:, 0, 0] == 255).all() and tuple(got[:, 16, 16]) == (255, 0, 0)
    palette = Image.fromarray(cutout, "RGBA").convert("P")  # a palette with transparency
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert (decoded(_encoded(palette, "PNG", transparency=palette.getpixel((0, 0))))[:, 0, 0]
            == 255).all()  # fmt: skip
    # EXIF orientation 6 (the sensor's pixels turned 90° counter-clockwise): upright again
    upright = np.zeros((64, 96, 3), np.uint8)
    upright[:, :48] = (0, 0, 255)  # blue left half, white right half
    upright[:, 48:] = 255
    sensor = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = decoded(_encoded(sensor, "JPEG", quality=95, exif=exif.tobytes()))
    reference = decoded(_encoded(Image.fromarray(upright), "JPEG", quality=95))
    assert np.abs(turned - reference).mean() < 4
