"""`dynemb embed-all --out`: OUT is replaced whole, so what it may be is checked before the
job starts (--overwrite deleted an events folder given as OUT; `--out .` was a traceback;
a file as OUT failed after the whole job)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynemb.bulk import EmbedAllOptions, check_out_dir, embed_all
from dynemb.errors import UsageError


@pytest.fixture
def setup(tmp_path):
    events = tmp_path / "events"
    events.mkdir()
    (events / "a.jsonl").write_text('{"user": "u", "time": 1, "text": "x"}\n')
    repository = tmp_path / "repo"
    (repository / "recommend").mkdir(parents=True)
    (tmp_path / "file").write_text("")
    return tmp_path, events, repository


@pytest.mark.parametrize(
    ("out", "said"),
    [
        (".", "name a folder of its own"),
        ("file", "is a file"),
        ("events", "would replace the events"),
        ("", "would replace the events"),  # the folder holding the events
        ("repo", "would replace the model repository"),
        ("repo/embedded", "outside the model repository"),
    ],
)
def test_an_out_that_cannot_be_replaced_whole_is_refused_before_the_job(
    setup, out, said, monkeypatch
):
    tmp_path, events, repository = setup
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    path = Path(out) if out == "." else tmp_path / out
    with pytest.raises(UsageError, match=said):
        check_out_dir(path, events, repository)
    options = EmbedAllOptions(events, path, repository, overwrite=True)
    with pytest.raises(UsageError, match=said):
        embed_all(options, say=lambda line: None)
    assert (events / "a.jsonl").exists() and (repository / "recommend").is_dir()


def test_out_beside_or_inside_the_events_folder_is_fine(setup):
    tmp_path, events, repository = setup
    check_out_dir(tmp_path / "embedded", events, repository)
    check_out_dir(events / "embedded", events, repository)  # event files are read, not folders
