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
        ("..", "name a folder of its own"),  # its rmtree would have taken the working folder
        ("file", "is a file"),
        ("events", "would replace the events"),
        ("", "would replace the events"),  # the folder holding the events
        ("repo", "would replace the model repository"),
        ("repo/embedded", "must be outside the model repository"),
    ],
)
def test_an_out_that_cannot_be_replaced_whole_is_refused_before_the_job(
    setup, out, said, monkeypatch, tmp_path_factory
):
    tmp_path, events, repository = setup
    monkeypatch.chdir(tmp_path_factory.mktemp("work"))  # "." and "..": not tmp_path
    path = Path(out) if out in (".", "..") else tmp_path / out
    with pytest.raises(UsageError, match=said):
        check_out_dir(path, events, repository)
    for overwrite in (True, False):  # without --overwrite too: never advised to pass it
        options = EmbedAllOptions(events, path, repository, overwrite=overwrite)
        with pytest.raises(UsageError, match=said):
            embed_all(options, say=lambda line: None)
    assert (events / "a.jsonl").exists() and (repository / "recommend").is_dir()


def test_out_beside_or_inside_the_events_folder_is_fine(setup):
    tmp_path, events, repository = setup
    check_out_dir(tmp_path / "embedded", events, repository)
    check_out_dir(events / "embedded", events, repository)  # event files are read, not folders


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from dynemb.paths import replace_dir

    out, new = tmp_path / "out", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    real_rename = Path.rename

    def interrupted(self, target):  # Ctrl-C as `new` is renamed in
        if self == new:
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["old.txt"]  # put back
    monkeypatch.undo()
    replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["new.txt"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_user_the_stages_refuse_is_named_with_the_file(tmp_path, repo):
    """A text over preprocess's limit failed the batch in the embedder: Ray's traceback
    of hundreds of lines, naming neither the user nor the file."""
    import json

    import numpy as np

    from dynemb.bulk import Embedder, read_histories
    from dynemb.data.jsonl import DataError

    path = tmp_path / "events.jsonl"
    lines = [
        {"user": "a", "time": 1_700_000_000, "text": "a lamp"},
        {"user": "b", "time": 1_700_000_000, "text": "x" * 70_000},
    ]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    rows = read_histories(path, repo)
    batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    with pytest.raises(DataError, match=rf"^{path}: user 'b': EVENT_TEXT\[0\]: 70000 bytes"):
        Embedder(str(repo), k=5)(batch)
