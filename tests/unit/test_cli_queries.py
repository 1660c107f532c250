"""`dynemb embed` / `recommend` as a user runs them without a server: what can be refused
is refused before any server is asked, a server that is not up is one line at once (the
client alone retried for 30 s, a warning a retry), and output that cannot be written is
one line too (a full disk printed a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

NO_SERVER = "127.0.0.1:1"  # nothing listens on port 1


def dynemb(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dynemb", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )


@pytest.fixture
def events(tmp_path: Path) -> Path:
    path = tmp_path / "events.jsonl"
    lines = [{"user": "u1", "time": 1_700_000_000 + i, "text": f"t{i}"} for i in range(3)]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    return path


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["embed"], "no server ready at 127.0.0.1:1"),
        (["recommend"], "no server ready at 127.0.0.1:1"),
        (["recommend", "--k", "0"], "--k must be in 1..100, got 0"),
        (["embed", "--at", "nan"], "--at: time must be finite"),
        (["embed", "--at", "yesterday"], "--at must be unix seconds or an ISO-8601 time"),
        (["embed", "--at", "2023-11-16T00:00:00Z"], "no server ready at 127.0.0.1:1"),
        # read as unix seconds it was 1970, before every event: E_t of empty histories
        (["embed", "--at", "20231116"], "--at 20231116 is ambiguous: the date 2023-11-16"),
        (["embed", "--at", "20231116.0"], "no server ready at 127.0.0.1:1"),
        (["embed", "--at", "1700000000"], "no server ready at 127.0.0.1:1"),
        # a folder with no built model: events would go without the item-id labels the
        # trained model reads, answers depending on the folder the command ran in
        (["embed", "--repository", "."], "--repository .: no built model repository there"),
    ],
)
def test_without_a_server_a_command_says_what_is_wrong_in_one_line_at_once(
    events, repo, args, said
):
    started = time.monotonic()
    command, *options = args  # the case's own --repository, if any, comes last and wins
    done = dynemb(
        command, "--events", str(events), "--url", NO_SERVER, "--repository", str(repo), *options
    )
    assert time.monotonic() - started < 30  # the client's retry deadline, were it waited out
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("dynemb: error: ") and said in line


def test_an_event_the_client_would_refuse_is_named_before_anything_is_printed(tmp_path):
    """u1 is fine and u2's time is in milliseconds: the file's line, and nothing printed
    for u1 first."""
    path = tmp_path / "ms.jsonl"
    path.write_text(
        '{"user": "u1", "time": 1700000000, "text": "a"}\n'
        '{"user": "u2", "time": 1700000000000, "text": "b"}\n'
    )
    done = dynemb("embed", "--events", str(path), "--url", NO_SERVER)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (
        f"dynemb: error: {path}:2: 'time' 1700000000000 is after the year 2100 "
        "(milliseconds? 'time' is in seconds)"
    )


def test_an_output_path_through_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    done = dynemb("k8s", "--out", str(tmp_path / "file" / "k8s"))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("dynemb: error: Not a directory")
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full here")
def test_a_full_disk_under_stdout_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        done = dynemb("--help", stdout=full)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["dynemb: error: No space left on device"]


def test_versions_of_replicas_says_one_line_each_when_some_are_down():
    """It stopped at the first replica that did not answer: the others were never asked."""
    done = dynemb("versions", "--url", NO_SERVER, "--url", "127.0.0.1:2")
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert [line.split()[:3] for line in lines] == [
        [NO_SERVER, "no", "answer:"],
        ["127.0.0.1:2", "no", "answer:"],
    ]


def test_a_reader_gone_before_the_output_is_quiet():
    """`dynemb ... | head` whose reader has closed: status 1, no traceback."""
    import os

    read, write = os.pipe()
    os.close(read)  # every write now fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dynemb", "--help"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 1 and done.stderr == ""


def test_events_with_more_labels_than_the_model_reads_are_said_to_be_cut(tmp_path, repo):
    """The model reads M labels an event (as training did, the rest cut): a file whose
    events carry more lost them without a word, a trailing rating: label included."""
    path = tmp_path / "many.jsonl"
    labels = [f"tag:{i}" for i in range(9)]
    path.write_text(
        json.dumps({"user": "u1", "time": 1_700_000_000, "text": "a", "labels": labels}) + "\n"
    )
    done = dynemb("embed", "--events", str(path), "--url", NO_SERVER, "--repository", str(repo))
    warning, error = done.stderr.strip().splitlines()
    assert "1 event(s) carry more labels than the model reads (8" in warning
    assert "user 'u1' at 1700000000.0" in warning and "no server ready" in error
