"""JSON Lines events: parsing, derived items, image paths, and errors that name the line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dynemb.data import DataError, load_dataset
from dynemb.data.jsonl import iter_user_events, load_jsonl

PNG_A = b"\x89PNG\r\n\x1a\nA"  # a PNG's signature: what the client checks before sending


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


def test_events_items_and_order(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(PNG_A)
    path = write_lines(
        tmp_path / "events.jsonl",
        [
            {"user": "u2", "time": 50, "text": "Toy Story", "labels": ["genre:Comedy"]},
            {
                "user": "u1",
                "time": "2023-11-14T22:13:20Z",
                "text": "Lamp",
                "image": "img/a.png",
                "labels": ["category:home", "action:buy", "rating:5"],
                "item": "lamp-1",
                "rating": 5,
            },
            "",
            "   ",
            {"user": "u1", "time": 1_600_000_000.5, "text": "Toy Story", "image": None},
            {"user": "u2", "time": 10, "text": "Heat", "item": "heat"},
        ],
    )
    data = load_jsonl(path)
    assert data.name == "events" and not data.synthetic
    order = [(e.user_id, e.time, e.text) for e in data.interactions]
    assert order == [
        ("u1", 1_600_000_000.5, "Toy Story"),
        ("u1", 1_700_000_000.0, "Lamp"),  # 2023-11-14T22:13:20Z
        ("u2", 10.0, "Heat"),
        ("u2", 50.0, "Toy Story"),
    ]
    lamp = data.interactions[1]
    assert lamp.image == PNG_A and lamp.rating == 5.0 and lamp.item_id == "lamp-1"
    assert lamp.labels == ("category:home", "action:buy", "rating:5")
    # Same text without an item id -> same stable item; labels of the first line in the file.
    toy_ids = {e.item_id for e in data.interactions if e.text == "Toy Story"}
    assert len(toy_ids) == 1
    (toy_id,) = toy_ids
    assert data.items[toy_id].labels == ("genre:Comedy",)
    assert load_jsonl(path).interactions[0].item_id == toy_id  # stable across loads
    # Event-level labels do not become item labels.
    assert data.items["lamp-1"].labels == ("category:home",)
    assert data.items["lamp-1"].image == PNG_A
    assert set(data.items) == {"lamp-1", "heat", toy_id}


def test_equal_times_keep_file_order(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "e.jsonl",
        [{"user": "u", "time": 5, "text": t} for t in ("c", "a", "b")]
        + [{"user": "u", "time": 1, "text": "first"}],
    )
    assert [e.text for e in load_jsonl(path).interactions] == ["first", "c", "a", "b"]


def test_naive_iso_time_is_utc(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "e.jsonl", [{"user": "u", "time": "1970-01-02", "text": "x"}])
    assert load_jsonl(path).interactions[0].time == 86_400.0


GOOD = {"user": "u1", "time": 1, "text": "ok"}


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ({"time": 1, "text": "x"}, "missing required key 'user'"),
        ({"user": "u", "text": "x"}, "missing required key 'time'"),
        ({"user": "u", "time": 1}, "missing required key 'text'"),
        ({"user": "u", "time": 1, "text": None}, "'text' must be a string, got null"),
        ({"user": 7, "time": 1, "text": "x"}, "'user' must be a string, got int"),
        ({"user": "", "time": 1, "text": "x"}, "'user' must be a non-empty string"),
        ({"user": "u", "time": -5, "text": "x"}, "'time' must be a finite, non-negative"),
        ({"user": "u", "time": True, "text": "x"}, "'time' must be unix seconds"),
        ({"user": "u", "time": "yesterday", "text": "x"}, "'time' must be unix seconds"),
        ({"user": "u", "time": 1, "text": 3}, "'text' must be a string"),
        ({"user": "u", "time": 1, "text": "x", "labels": "genre:A"}, "'labels' must be a list"),
        ({"user": "u", "time": 1, "text": "x", "labels": ["a", 2]}, r"'labels'\[1\]"),
        ({"user": "u", "time": 1, "text": "x", "rating": "5"}, "'rating' must be"),
        ({"user": "u", "time": 1, "text": "x", "lables": ["a"]}, "unknown key.*'lables'"),
        ({"user": "u", "time": 1, "text": "x", "image": "nope.png"}, "cannot read image"),
        ({"user": "u", "time": 1_700_000_000_000, "text": "x"}, r"after the year 2100 \(millis"),
        ('{"user": "u", "time": 1' + "0" * 400 + ', "text": "x"}', "too large for unix sec"),
        ('{"user": "u", "time": 1' + "0" * 5000 + ', "text": "x"}', "JSON this reader cannot"),
        ('{"user": "u", "time": 1, "text": "x", "labels": ' + "[" * 10**5, "JSON this reader"),
        ('{"user": "\\ud800", "time": 1, "text": "x"}', "'user' is not valid text"),
        ('{"user": "u", "time": 1, "text": "a\\udc80"}', "'text' is not valid text"),
        ('{"user": "u", "time": 1, "text": "x", "item": "\\ud800"}', "'item' is not valid"),
        ('{"user": "u", "time": 1, "text": "x", "labels": ["\\ud800"]}', r"'labels'\[0\] is"),
        ({"user": "u", "time": 1, "text": "x", "image": "text.png"}, "is not PNG, JPEG"),
    ],
)
def test_errors_name_the_line(tmp_path: Path, bad: object, fragment: str) -> None:
    (tmp_path / "text.png").write_text("not an image")
    path = write_lines(tmp_path / "events.jsonl", [GOOD, "", GOOD, GOOD, GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError, match=rf"events\.jsonl:7: .*{fragment}"):
        load_jsonl(path)


def test_data_error_is_a_value_error_and_empty_file_fails(tmp_path: Path) -> None:
    assert issubclass(DataError, ValueError)
    with pytest.raises(DataError, match="no events"):
        load_jsonl(write_lines(tmp_path / "empty.jsonl", ["", ""]))


def test_an_events_file_that_cannot_be_read_is_a_data_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read the events file: No such"):
        load_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r": cannot read the events file: Is a directory"):
        load_jsonl(tmp_path)


def test_the_cli_says_so_in_one_line(tmp_path: Path) -> None:
    """`dynemb embed --events` with a path that is not there: one line and status 1, no
    traceback (it printed a FileNotFoundError's)."""
    missing = tmp_path / "missing.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "dynemb", "embed", "--events", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"dynemb: error: {missing}: cannot read the events file: No such file or directory"
    ]


def test_iter_user_events(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "e.jsonl",
        [
            {"user": "b", "time": 3, "text": "b1"},
            {"user": "a", "time": 2, "text": "a2"},
            {"user": "a", "time": 1, "text": "a1"},
        ],
    )
    everyone = {user: [e.text for e in events] for user, events in iter_user_events(path)}
    assert everyone == {"a": ["a1", "a2"], "b": ["b1"]}
    assert [(u, len(ev)) for u, ev in iter_user_events(path, user="b")] == [("b", 1)]
    with pytest.raises(DataError, match="no events for user 'zed'"):
        list(iter_user_events(path, user="zed"))


def test_load_dataset_registry(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "mine.jsonl", [GOOD])
    assert load_dataset(str(path), tmp_path).name == "mine"
    synthetic = load_dataset("synthetic", tmp_path)
    assert synthetic.synthetic and synthetic.name == "synthetic"
    with pytest.raises(DataError, match=r"unknown data set 'ml100k'.*ml-100k, synthetic"):
        load_dataset("ml100k", tmp_path)


def test_load_dataset_ml100k_uses_cached_files(tmp_path: Path) -> None:
    cached = tmp_path / "ml-100k"
    cached.mkdir()
    (cached / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "1\tToy Story\t1995\tComedy\n"
    )
    (cached / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t4\t9\n"
    )
    data = load_dataset("ml-100k", tmp_path)  # files present: no download
    assert data.name == "ml-100k" and len(data.interactions) == 1


def test_parquet_events_read_as_the_same_lines(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dynemb.data.jsonl import load_events

    (tmp_path / "a.png").write_bytes(PNG_A)
    records = [
        {"user": "u1", "time": 20, "text": "Lamp", "image": "a.png", "labels": ["x:1"]},
        {"user": "u1", "time": 10, "text": "Heat", "image": None, "labels": None},
        {"user": "u2", "time": 5, "text": "Heat", "image": None, "labels": ["x:2"]},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "events.parquet")
    write_lines(tmp_path / "events.jsonl", list(records))
    from_parquet = load_events(tmp_path / "events.parquet")
    from_lines = load_events(tmp_path / "events.jsonl")
    assert from_parquet.interactions == from_lines.interactions
    assert from_parquet.by_user()["u1"][1].image == PNG_A


def test_parquet_errors_name_the_row_and_other_suffixes_are_refused(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dynemb.data.jsonl import load_events

    rows = [{"user": "u1", "time": 1, "text": "a"}, {"user": "u1", "time": -1, "text": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:2: 'time'"):
        load_events(tmp_path / "bad.parquet")
    (tmp_path / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_events(tmp_path / "x.parquet")
    with pytest.raises(DataError, match="not an events file"):
        load_events(tmp_path / "events.csv")


def test_a_rating_field_reaches_the_model_as_its_label(tmp_path: Path) -> None:
    """Only labels reach the model: a 'rating' field was read, checked and then ignored
    (two files differing only in it gave the same E_t)."""
    path = write_lines(
        tmp_path / "events.jsonl",
        [
            {"user": "u", "time": 1, "text": "a", "rating": 4},
            {"user": "u", "time": 2, "text": "b", "rating": 4.5, "labels": ["genre:x"]},
            {"user": "u", "time": 3, "text": "c", "rating": 3, "labels": ["rating:3"]},
            {"user": "u", "time": 4, "text": "d"},
        ],
    )
    labels = [e.labels for e in load_jsonl(path).interactions]
    assert labels == [("rating:4",), ("rating:4.5", "genre:x"), ("rating:3",), ()]
    bad = write_lines(
        tmp_path / "bad.jsonl",
        [{"user": "u", "time": 1, "text": "a", "rating": 2, "labels": ["rating:5"]}],
    )
    with pytest.raises(
        DataError, match=r"bad.jsonl:1: 'rating' 2 and the label 'rating:5' disagree"
    ):
        load_jsonl(bad)


def test_a_catalogue_or_events_file_is_read_by_its_suffix_and_a_missing_one_said_so(
    tmp_path: Path,
) -> None:
    """build and embed read Parquet as embed-all does (they had parsed it as JSON Lines:
    "invalid JSON" at line 1), and a mistyped path is "no such file" (it was an unknown
    data set, after the build's first progress bar)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"user": "u", "time": 1, "text": "a"}, {"user": "v", "time": 2, "text": "b"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "events.parquet")
    assert [u for u, _ in iter_user_events(tmp_path / "events.parquet")] == ["u", "v"]
    assert len(load_dataset(str(tmp_path / "events.parquet"), tmp_path).interactions) == 2
    with pytest.raises(DataError, match=r"catalog\.jsonl: no such file"):
        load_dataset(str(tmp_path / "catalog.jsonl"), tmp_path)
    with pytest.raises(DataError, match="unknown data set 'ml-1m'"):
        load_dataset("ml-1m", tmp_path)
