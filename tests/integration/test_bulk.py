"""`dynemb embed-all` on a local Ray: a small population in JSON Lines and Parquet files,
every user's E_t equal to the served one (1e-4) and its top-k equal to `recommend` with
the user's own items left out; a bad file or an existing OUT leaves nothing behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from dynemb.bench.bulk import write_population
from dynemb.bulk import EmbedAllOptions, embed_all, read_embeddings
from dynemb.data.jsonl import DataError, load_events
from dynemb.data.synthetic import draw_item_image
from dynemb.errors import UsageError
from dynemb.queries import embed_events, recommend_events


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> Path:
    """45 users: two JSON Lines files, one Parquet file, and a few events with images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = tmp_path_factory.mktemp("population")
    files = write_population(directory, users=40, files=3, seed=1)
    table = pa.Table.from_pylist([json.loads(line) for line in files[2].read_text().splitlines()])
    pq.write_table(table, directory / "events-002.parquet")
    files[2].unlink()
    rng = random.Random(0)
    with (directory / "events-003.jsonl").open("w") as out:
        for u in range(5):
            for i in range(1 + 3 * u):
                image = f"img-{u}-{i}.png" if i % 2 else None
                if image:
                    (directory / image).write_bytes(draw_item_image(i % 6, rng, 32))
                event = {
                    "user": f"pictures-{u}",
                    "time": 1_700_000_000 + 600 * i,
                    "text": f"Azure ring lamp #{i}",
                    "image": image,
                    "labels": [f"category:c{i % 6}"],
                }
                out.write(json.dumps(event) + "\n")
    return directory


def test_embed_all_equals_the_served_answers(live, events, tmp_path) -> None:
    out = tmp_path / "out"
    result = embed_all(EmbedAllOptions(events, out, live.repository, k=10, workers=2))
    assert result.users == 45 and result.files == 4
    assert not (tmp_path / ".out.making").exists()  # the staging folder (made_beside)
    embedded = read_embeddings(out)
    assert len(embedded) == 45
    import pyarrow.parquet as pq

    rows = {r["user"]: r for r in pq.read_table(out).to_pylist()}
    for path in sorted(events.iterdir()):
        if path.suffix not in (".jsonl", ".parquet"):
            continue
        if path.suffix == ".parquet":  # the served side reads JSON Lines: write it as one
            lines = path.with_suffix(".from-parquet.jsonl")
            with lines.open("w") as handle:
                for e in load_events(path).interactions:
                    record = {"user": e.user_id, "time": e.time, "text": e.text}
                    record["labels"] = list(e.labels)
                    handle.write(json.dumps(record) + "\n")
            path = lines
        for served in embed_events(path, None, None, live.url, live.repository):
            assert np.abs(embedded[served.user] - served.embedding).max() <= 1e-4, served.user
        for served in recommend_events(path, None, None, 10, True, live.url, live.repository):
            row = rows[served.user]
            assert row["items"] == [i.item_id for i in served.items], served.user
            assert np.allclose(row["scores"], [i.score for i in served.items], atol=1e-4)
            assert row["at"] == max(e.time for e in load_events(path).by_user()[served.user])


def test_embed_all_refuses_and_leaves_nothing_behind(live, events, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UsageError, match="exists"):
        embed_all(EmbedAllOptions(events, out, live.repository, workers=1))
    with pytest.raises(UsageError, match=r"no \.jsonl"):
        embed_all(EmbedAllOptions(tmp_path / "out", tmp_path / "o2", live.repository))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jsonl").write_text('{"user": "u", "time": 1, "text": "x"}\n{"user": "u"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: missing required key"):
        embed_all(EmbedAllOptions(bad, tmp_path / "o3", live.repository, workers=1))
    assert not (tmp_path / "o3").exists() and not (tmp_path / ".o3.making").exists()


def test_a_refusal_only_the_server_finds_names_the_user_and_nothing_is_printed(live, tmp_path):
    """A text over the server's limit (the client does not check it) in the second user's
    events: the first user's line was printed, then an error naming neither the user nor
    the file."""
    import subprocess
    import sys

    path = tmp_path / "events.jsonl"
    lines = [
        {"user": "a", "time": 1_700_000_000, "text": "a lamp"},
        {"user": "b", "time": 1_700_000_000, "text": "x" * 70_000},
    ]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    with pytest.raises(DataError, match=r"events.jsonl: user 'b': .*EVENT_TEXT\[0\]: 70000 bytes"):
        embed_events(path, None, None, live.url, live.repository)
    done = subprocess.run(
        [sys.executable, "-m", "dynemb", "recommend", "--events", str(path), "--url", live.url,
         "--repository", str(live.repository)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"dynemb: error: {path}: user 'b': ")


def test_a_bad_events_line_is_one_line_of_error_without_rays_logs(built_repository, tmp_path):
    """Ray logged its start, the execution plan, progress and an 80-line traceback of a
    worker's error around the one line that says what is wrong; without -v only the
    error line is left (and Ray Core's one line on its own actors' restarts)."""
    import subprocess
    import sys

    path = tmp_path / "events.jsonl"
    lines = [{"user": "u", "time": 1, "text": "x"}, {"user": "u", "time": "soon", "text": "y"}]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "dynemb", "embed-all", "--events", str(path),
         "--out", str(tmp_path / "out"), "--repository", str(built_repository), "--workers", "1"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1].startswith(f"dynemb: error: {path}:2: 'time' must be"), done.stderr
    assert lines[0] == "1 events file(s), 1 embedder(s)", done.stderr
    noise = [ln for ln in lines[1:-1] if "core_worker.cc" not in ln]
    assert not noise, done.stderr
