"""build_inputs: the client's half of the wire contract, checked without a server."""

from __future__ import annotations

import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from dynemb_client import ClientInputError, Event, ModelShape, ServerError, build_inputs
from dynemb_client import requests as requests_mod
from dynemb_client.contract import (
    EVENT_COUNT,
    EVENT_IMAGE,
    EVENT_LABELS,
    EVENT_TEXT,
    EVENT_TIME,
    ITEM_IDS,
    ITEM_SCORES,
    ITEM_TITLES,
    MAX_TIME_S,
    MAX_TOP_K,
    QUERY_TIME,
    TOP_K,
    USER_EMBEDDING,
)
from dynemb_client.requests import embedding_call, exclusion_sets, versions_asked
from dynemb_client.results import parse_recommendations, parse_versions

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16
GIF = b"GIF89a" + b"\x00" * 16
BMP = b"BM" + b"\x00" * 16
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8
T0 = 1_700_000_000.0


def ev(offset: float, text: str = "", **kwargs) -> Event:
    return Event(time=T0 + offset, text=text or f"e{offset:g}", **kwargs)


def build_one(events, at=None, *, max_events=4, max_labels=3, top_k=None):
    return build_inputs([events], [at], max_events, max_labels, top_k=top_k)


def test_shapes_and_dtypes() -> None:
    arrays = build_inputs([[ev(0)], [ev(1), ev(2)]], [None, None], 4, 3, top_k=5)
    expected = {
        EVENT_TEXT: ((2, 4), np.object_),
        EVENT_IMAGE: ((2, 4), np.object_),
        EVENT_LABELS: ((2, 4, 3), np.object_),
        EVENT_TIME: ((2, 4), np.float64),
        EVENT_COUNT: ((2, 1), np.int32),
        QUERY_TIME: ((2, 1), np.float64),
        TOP_K: ((2, 1), np.int32),
    }
    assert {name: (a.shape, a.dtype.type) for name, a in arrays.items()} == expected
    assert all(isinstance(x, bytes) for x in arrays[EVENT_LABELS].ravel())
    assert arrays[TOP_K].ravel().tolist() == [5, 5]


def test_top_k_absent_for_embedding_requests() -> None:
    assert TOP_K not in build_one([ev(0)])


def test_padding_comes_after_real_events() -> None:
    events = [ev(0, "a", labels=("genre:Comedy", "rating:4"), image=PNG), ev(5, "b")]
    arrays = build_one(events)
    assert arrays[EVENT_COUNT][0, 0] == 2
    assert arrays[EVENT_TEXT][0].tolist() == [b"a", b"b", b"", b""]
    assert arrays[EVENT_IMAGE][0].tolist() == [PNG, b"", b"", b""]
    assert arrays[EVENT_TIME][0].tolist() == [T0, T0 + 5, 0.0, 0.0]
    assert arrays[EVENT_LABELS][0, 0].tolist() == [b"genre:Comedy", b"rating:4", b""]
    assert arrays[EVENT_LABELS][0, 1:].tolist() == [[b""] * 3] * 3


def test_truncation_keeps_the_most_recent_events() -> None:
    events = [ev(i, f"e{i}") for i in (5, 0, 3, 1, 4, 2)]
    arrays = build_one(events, max_events=4)
    assert arrays[EVENT_COUNT][0, 0] == 4
    assert arrays[EVENT_TEXT][0].tolist() == [b"e2", b"e3", b"e4", b"e5"]
    assert arrays[EVENT_TIME][0].tolist() == [T0 + 2, T0 + 3, T0 + 4, T0 + 5]


def test_sort_is_by_time_and_stable() -> None:
    events = [ev(2, "late"), ev(1, "tie-first"), ev(1, "tie-second"), ev(0, "early")]
    arrays = build_one(events)
    assert arrays[EVENT_TEXT][0].tolist() == [b"early", b"tie-first", b"tie-second", b"late"]
    times = arrays[EVENT_TIME][0]
    assert np.all(np.diff(times) >= 0)


def test_default_query_time_is_the_newest_event() -> None:
    arrays = build_one([ev(7), ev(3)])
    assert arrays[QUERY_TIME][0, 0] == T0 + 7


def test_explicit_query_time_and_later_events_are_dropped_before_truncation() -> None:
    events = [ev(i, f"e{i}") for i in range(8)]
    arrays = build_one(events, at=T0 + 4.5, max_events=3)
    assert arrays[QUERY_TIME][0, 0] == T0 + 4.5
    assert arrays[EVENT_TEXT][0].tolist() == [b"e2", b"e3", b"e4"]
    # An event exactly at t is not "after t" and is kept.
    assert build_one(events, at=T0 + 7)[EVENT_COUNT][0, 0] == 4


def test_cold_start_uses_now(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(requests_mod.time, "time", lambda: 1_234_567.0)
    arrays = build_one([])
    assert arrays[EVENT_COUNT][0, 0] == 0
    assert arrays[QUERY_TIME][0, 0] == 1_234_567.0
    assert arrays[EVENT_TEXT][0].tolist() == [b""] * 4
    assert arrays[EVENT_TIME][0].tolist() == [0.0] * 4


def test_cold_start_next_to_a_warm_user() -> None:
    arrays = build_inputs([[], [ev(1)]], [T0 + 10, None], 4, 3)
    assert arrays[EVENT_COUNT].ravel().tolist() == [0, 1]
    assert arrays[QUERY_TIME].ravel().tolist() == [T0 + 10, T0 + 1]


def test_datetimes_naive_is_utc_and_aware_is_converted() -> None:
    naive = datetime(2024, 1, 2, 3, 4, 5)
    aware = datetime(2024, 1, 2, 5, 4, 6, tzinfo=timezone(timedelta(hours=2)))
    arrays = build_one([Event(naive, "a"), Event(aware, "b")], at=datetime(2024, 1, 3))
    utc = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()
    assert arrays[EVENT_TIME][0, :2].tolist() == [utc, utc + 1]
    assert arrays[QUERY_TIME][0, 0] == datetime(2024, 1, 3, tzinfo=timezone.utc).timestamp()


def test_text_bytes_and_unicode() -> None:
    arrays = build_one([ev(0, "café ☕"), Event(T0 + 1, "naïve".encode())])
    assert arrays[EVENT_TEXT][0, :2].tolist() == ["café ☕".encode(), "naïve".encode()]


@pytest.mark.parametrize("image", [PNG, JPEG, GIF, BMP, WEBP, bytearray(PNG), b"", None])
def test_known_image_formats_pass(image) -> None:
    arrays = build_one([ev(0, image=image)])
    assert arrays[EVENT_IMAGE][0, 0] == (bytes(image) if image else b"")


def test_image_path_is_read_when_the_request_is_built(tmp_path) -> None:
    path = tmp_path / "poster.png"
    event = ev(0, image=path)  # the file does not exist yet: nothing is read here
    with pytest.raises(ClientInputError) as info:
        build_one([event])
    assert info.value.field == EVENT_IMAGE
    path.write_bytes(PNG)
    assert build_one([event])[EVENT_IMAGE][0, 0] == PNG
    assert build_one([ev(0, image=str(path))])[EVENT_IMAGE][0, 0] == PNG


def test_event_with_list_labels_is_hashable() -> None:
    event = ev(0, labels=["genre:Comedy"])
    assert event.labels == ("genre:Comedy",)
    assert hash(event) == hash(ev(0, labels=("genre:Comedy",)))


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (Event(-1.0, "a"), EVENT_TIME),
        (Event(math.nan, "a"), EVENT_TIME),
        (Event(math.inf, "a"), EVENT_TIME),
        (Event(MAX_TIME_S + 1, "a"), EVENT_TIME),
        (Event(T0 * 1000, "a"), EVENT_TIME),  # milliseconds
        (Event("2024-01-01", "a"), EVENT_TIME),
        (Event(True, "a"), EVENT_TIME),
        (Event(T0, b"\xff\xfe bad"), EVENT_TEXT),
        (Event(T0, None), EVENT_TEXT),
        (Event(T0, "a", labels=("a", "b", "c", "d")), EVENT_LABELS),
        (Event(T0, "a", labels=("genre:Comedy", "")), EVENT_LABELS),
        (Event(T0, "a", labels=(b"genre:Comedy",)), EVENT_LABELS),
        (Event(T0, "a", labels=(3,)), EVENT_LABELS),
        (Event(T0, "a", labels="genre:Comedy"), EVENT_LABELS),
        (Event(T0, "a", labels={"genre:Comedy", "genre:Drama"}), EVENT_LABELS),  # unordered
        (Event(T0, "a", labels=frozenset({"genre:Comedy"})), EVENT_LABELS),
        (Event(T0, "text \ud800 with a lone surrogate"), EVENT_TEXT),
        (Event(T0, "a", labels=("genre:\udfff",)), EVENT_LABELS),
        (Event(T0, "a", image="/nonexistent/poster.png"), EVENT_IMAGE),
        (Event(T0, "a", image=b"not an image at all"), EVENT_IMAGE),
        (Event(T0, "a", image=b"RIFF\x00\x00\x00\x00AVI "), EVENT_IMAGE),
        (Event(T0, "a", image=42), EVENT_IMAGE),
        (Event(T0, "a", image=""), EVENT_IMAGE),  # said "image file '.' does not exist"
        (Event(T0, "a", labels={"genre:Comedy": 1}), EVENT_LABELS),  # took the dict's keys
        (Event(10**400, "a"), EVENT_TIME),  # an OverflowError
    ],
)
def test_bad_event_names_its_field_and_index(event: Event, field: str) -> None:
    history = [ev(-3), ev(-2), event]
    with pytest.raises(ClientInputError) as info:
        build_one(history)
    assert info.value.field == field
    assert info.value.index == 2
    assert field in str(info.value) and "event 2" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_image_file_that_is_not_an_image(tmp_path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ClientInputError, match=r"notes\.txt") as info:
        build_one([ev(0, image=path)])
    assert (info.value.field, info.value.index) == (EVENT_IMAGE, 0)


def test_error_in_a_batch_names_the_history() -> None:
    with pytest.raises(ClientInputError) as info:
        build_inputs([[ev(0)], [ev(0), Event(-5, "x")]], [None, None], 4, 3)
    assert (info.value.field, info.value.index, info.value.history) == (EVENT_TIME, 1, 1)
    assert "history 1" in str(info.value) and "event 1" in str(info.value)


@pytest.mark.parametrize("at", [math.nan, -1.0, math.inf, MAX_TIME_S * 2])
def test_bad_query_time(at: float) -> None:
    with pytest.raises(ClientInputError) as info:
        build_one([ev(0)], at=at)
    assert (info.value.field, info.value.index) == (QUERY_TIME, None)
    assert QUERY_TIME in str(info.value)


@pytest.mark.parametrize("top_k", [0, -1, MAX_TOP_K + 1, True, 2.5])
def test_bad_top_k(top_k) -> None:
    with pytest.raises(ClientInputError) as info:
        build_one([ev(0)], top_k=top_k)
    assert info.value.field == TOP_K


def test_top_k_bounds_are_inclusive() -> None:
    assert build_one([ev(0)], top_k=1)[TOP_K][0, 0] == 1
    assert build_one([ev(0)], top_k=MAX_TOP_K)[TOP_K][0, 0] == MAX_TOP_K


def test_batch_level_mistakes() -> None:
    with pytest.raises(ClientInputError) as info:
        build_inputs([[ev(0)], [ev(1)]], [None], 4, 3)
    assert info.value.field == QUERY_TIME
    with pytest.raises(ClientInputError):
        build_inputs([], [], 4, 3)
    with pytest.raises(TypeError, match="sequence of Event"):
        build_inputs([ev(0)], [None], 4, 3)  # one history passed where a batch belongs


def test_import_needs_no_torch_transformers_or_pil() -> None:
    code = (
        "import sys\n"
        "for name in ('torch', 'transformers', 'PIL'):\n"
        "    sys.modules[name] = None\n"
        "import dynemb_client\n"
        "from dynemb_client import InterestClient, AsyncInterestClient, build_inputs\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_exclusion_sets_are_per_user_and_reject_a_bare_id() -> None:
    assert exclusion_sets(None, 2) == [frozenset(), frozenset()]
    assert exclusion_sets([["1", 2], []], 2) == [frozenset({"1", "2"}), frozenset()]
    assert exclusion_sets([None, ["1"]], 2) == [frozenset(), frozenset({"1"})]  # a TypeError
    with pytest.raises(ClientInputError, match="not one id"):
        exclusion_sets(["12"], 1)
    with pytest.raises(ClientInputError, match="1 entries for 2 users"):
        exclusion_sets([["1"]], 2)


def test_parse_recommendations_drops_excluded_ids_and_keeps_k() -> None:
    arrays = {
        ITEM_IDS: np.array([[b"a", b"b", b"c", b""], [b"a", b"b", b"c", b"d"]]),
        ITEM_SCORES: np.array([[4.0, 3.0, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0]], np.float32),
        ITEM_TITLES: np.array([[b"A", b"B", b"C", b""], [b"A", b"B", b"C", b"D"]]),
    }

    class Result:
        def as_numpy(self, name):
            return arrays[name]

    got = parse_recommendations(Result(), "recommend", 2, 2, [frozenset({"a"}), frozenset()])
    assert [[r.item_id for r in user] for user in got] == [["b", "c"], ["a", "b"]]
    assert [r.item_id for r in parse_recommendations(Result(), "recommend", 2, 5)[0]] == [
        "a",
        "b",
        "c",
    ]


def test_versions_are_read_per_stage_and_a_mixed_answer_is_an_error() -> None:
    arrays = {
        "TEXT_RNN_VERSION": np.array([[3], [3]], np.int64),
        "RETRIEVE_VERSION": np.array([[1], [2]], np.int64),
    }

    class Result:
        def as_numpy(self, name):
            return arrays.get(name)

    assert parse_versions(Result(), "recommend", 2, ("text_rnn",)) == {"text_rnn": 3}
    with pytest.raises(ServerError, match=r"retrieve: one answer from versions \[1, 2\]"):
        parse_versions(Result(), "recommend", 2, ("retrieve",))
    with pytest.raises(ServerError, match="IMAGE_CNN_VERSION missing"):
        parse_versions(Result(), "recommend", 2, ("image_cnn",))
    call = embedding_call("user_interest", [[]], None, ModelShape(50, 8))
    asked = versions_asked(call, ("text_rnn", "retrieve"))
    assert [o.name() for o in asked.outputs] == [
        USER_EMBEDDING,
        "TEXT_RNN_VERSION",
        "RETRIEVE_VERSION",
    ]
    assert asked.stages == ("text_rnn", "retrieve") and call.stages == ()


def test_a_single_query_time_of_any_accepted_type_is_one_time() -> None:
    """Not only int, float and datetime: a Decimal or a 0-d array is one time for every
    history (a list, tuple or 1-d array is one per history)."""
    from decimal import Decimal

    histories = [[ev(0)], [ev(1)]]
    for at in (Decimal(int(T0) + 5), np.array(T0 + 5), np.float64(T0 + 5)):
        call = embedding_call("user_interest", histories, at, ModelShape(50, 8))
        found = next(i for i in call.inputs if i.name() == QUERY_TIME)
        assert np.frombuffer(found._raw_content, np.float64).tolist() == [T0 + 5] * 2
    call = embedding_call("user_interest", histories, np.array([T0 + 5, T0 + 6]), ModelShape(50, 8))
    found = next(i for i in call.inputs if i.name() == QUERY_TIME)
    assert np.frombuffer(found._raw_content, np.float64).tolist() == [T0 + 5, T0 + 6]


@pytest.mark.parametrize("url", ["127.0.0.1:99999", "localhost", "127.0.0.1:", ":8001", 8001])
def test_an_endpoint_that_is_not_host_and_port_is_refused(url) -> None:
    """gRPC took port 99999 as 99999 % 65536 and a missing port as 443 (30 s of retries)."""
    from dynemb_client import AsyncInterestClient, InterestClient

    for make in (InterestClient, AsyncInterestClient):
        with pytest.raises(ClientInputError, match="expected host:port"):
            make(url)
    for good in ("127.0.0.1:8001", "[::1]:8001", "unix:/run/triton.sock"):
        InterestClient(good).close()


def test_an_async_client_used_in_a_second_event_loop_says_so() -> None:
    """Its channels belong to the loop of its first call: in another one they failed with
    "Event loop is closed"."""
    import asyncio

    from dynemb_client import AsyncInterestClient, ServerUnavailable

    client = AsyncInterestClient("127.0.0.1:1", retries=0, timeout_s=1)
    with pytest.raises(ServerUnavailable):  # nothing listens there: the first loop's call
        asyncio.run(client.embed([Event(T0, "a")]))
    with pytest.raises(RuntimeError, match="make a new client"):
        asyncio.run(client.embed([Event(T0, "a")]))


def test_an_image_path_that_is_a_directory_says_so(tmp_path) -> None:
    with pytest.raises(ClientInputError, match="is a directory, not a file"):
        build_one([ev(0, image=tmp_path)])
