"""`dynemb embed-all`: every user's E_t and top-k items, as a Ray Data job.

Input: events files in the format `dynemb embed` reads (JSON Lines, or Parquet with the
same columns), one file or a directory of them; each user's events in one file (shard by
user). Ray reads the files side by side (one task per file, with the same checks and
error messages as `dynemb embed`), then `map_batches` sends batches of users to
`Embedder` actors, each the in-process pipeline of the repository's serving versions on
one CPU. Output: Parquet files under OUT, one row per user: user, at (the query time:
the user's newest event), embedding (list<float32>, D), items and scores (top-k, the
user's own items left out, as `dynemb recommend` does).

Local Ray here (`ray.init(num_cpus=workers)`); on a cluster the same job with
`--address ray://head:10001` (or `auto`), every node reading the same repository path
and event files (a shared volume or object store paths).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynemb.data.jsonl import DataError
from dynemb.errors import DynembError, InputError, UsageError
from dynemb.paths import made_beside

EVENT_SUFFIXES = (".jsonl", ".json", ".parquet")
BATCH_USERS = 32  # users per actor call: the in-process benchmark's batch


@dataclass(frozen=True)
class EmbedAllOptions:
    events: Path
    out: Path
    repository: Path
    k: int = 10
    workers: int = max(1, os.cpu_count() or 1)  # actors, one CPU each
    address: str | None = None  # a Ray cluster; None: a local Ray of `workers` CPUs
    batch_users: int = BATCH_USERS
    overwrite: bool = False


@dataclass(frozen=True)
class EmbedAllResult:
    users: int
    files: int
    seconds: float
    out: Path

    @property
    def users_per_s(self) -> float:
        return self.users / self.seconds if self.seconds else 0.0


def event_files(events: Path) -> list[Path]:
    """`events` itself, or the events files directly in that directory, sorted."""
    if events.is_file():
        return [events]
    if not events.is_dir():
        raise UsageError(f"{events}: no such file or directory")
    files = sorted(p for p in events.iterdir() if p.is_file() and p.suffix in EVENT_SUFFIXES)
    if not files:
        raise UsageError(f"{events}: no {', '.join(EVENT_SUFFIXES)} files in it")
    return files


def read_histories(path: Path, repository: Path) -> list[dict[str, Any]]:
    """One row per user of an events file: user, at, and the history as the served model
    reads it (pickled client Events) with the user's item ids (to leave out)."""
    from dynemb.data.jsonl import load_events
    from dynemb.queries import event_converter

    convert = event_converter(repository)
    rows = []
    for user, interactions in load_events(path).by_user().items():
        history = [convert(e) for e in interactions]
        rows.append(
            {
                "user": user,
                "at": max(e.time for e in history),
                "history": pickle.dumps(history),
                "seen": [e.item_id for e in interactions],
                "file": str(path),
            }
        )
    return rows


class Embedder:
    """A Ray actor (or a plain object in-process): the repository's pipeline on one thread.
    A user whose events the stages refuse fails the job with a line naming the file and
    the user (it was Ray's traceback of a batch, hundreds of lines)."""

    def __init__(self, repository: str, k: int) -> None:
        import torch

        from dynemb.pipeline import Pipeline

        torch.set_num_threads(1)
        self.pipeline = Pipeline.from_repository(Path(repository))
        self.k = k
        dims = next(iter(self.pipeline.runners.values())).manifest.dims
        self.max_events, self.max_labels = dims.max_events, dims.max_labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from dynemb_client import build_inputs
        from dynemb_client import contract as wire

        histories = [pickle.loads(h) for h in batch["history"]]
        seen = [set(s) for s in batch["seen"]]
        at = [float(t) for t in batch["at"]]
        asked = min(wire.MAX_TOP_K, self.k + max(len(s) for s in seen))
        x = build_inputs(histories, at, self.max_events, self.max_labels, top_k=asked)
        try:
            out = self.pipeline.run(x, wire.RECOMMEND)
        except InputError as exc:  # content only the stages check (a text over the limit)
            if exc.row is None:  # preprocess names the user (row) of what it refuses
                raise DataError(f"a batch of users was refused: {exc}") from None
            j = exc.row
            raise DataError(f"{batch['file'][j]}: user {batch['user'][j]!r}: {exc}") from None
        items, scores = [], []
        for ids, row_scores, exclude in zip(
            out[wire.ITEM_IDS], out[wire.ITEM_SCORES], seen, strict=True
        ):
            kept = [
                (i.decode(), float(s))
                for i, s in zip(ids, row_scores, strict=True)
                if i and i.decode() not in exclude
            ][: self.k]
            items.append([i for i, _ in kept])
            scores.append([s for _, s in kept])
        embedding = np.asarray(out[wire.USER_EMBEDDING], dtype=np.float32)
        return self._table(batch, at, embedding, items, scores)

    @staticmethod
    def _table(batch, at, embedding, items, scores) -> Any:
        import pyarrow as pa

        return pa.table(
            {
                "user": pa.array(list(batch["user"]), pa.string()),
                "at": pa.array(at, pa.float64()),
                "embedding": pa.array(list(embedding), pa.list_(pa.float32())),
                "items": pa.array(items, pa.list_(pa.string())),
                "scores": pa.array(scores, pa.list_(pa.float32())),
            }
        )


def embed_all(options: EmbedAllOptions, say: Callable[[str], None] = print) -> EmbedAllResult:
    """Run the job; OUT appears only when every user is written (a failed or interrupted
    job leaves no partial OUT behind, and an existing OUT is kept unless `overwrite`)."""
    import ray
    import ray.data  # configures its loggers on import: before `_ray_data_quiet`

    files = event_files(options.events)
    if options.k < 1 or options.k > 100:
        raise UsageError(f"k must be in 1..100, got {options.k}")
    if options.workers < 1:
        raise UsageError(f"workers must be >= 1, got {options.workers}")
    repository = options.repository.resolve()
    if not (repository / "recommend").is_dir():
        raise UsageError(f"{repository}: not a built model repository (`dynemb build`)")
    check_out_dir(options.out, options.events, repository)  # before advising --overwrite
    if options.out.exists() and not options.overwrite:
        raise UsageError(f"{options.out} exists; pass --overwrite to replace it")
    out = options.out.resolve()
    verbose = logging.getLogger().isEnabledFor(logging.INFO)  # `dynemb -v`
    started_ray = not ray.is_initialized()
    if started_ray:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        level = logging.INFO if verbose else logging.ERROR
        if options.address:
            ray.init(address=options.address, log_to_driver=False, logging_level=level)
        else:
            ray.init(
                num_cpus=options.workers,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=level,
            )
    try:
        with made_beside(out) as staging, _ray_data_quiet(unless=verbose):
            say(f"{len(files)} events file(s), {options.workers} embedder(s)")
            ray.data.DataContext.get_current().raise_original_map_exception = True
            started = time.monotonic()
            paths = ray.data.from_items([{"path": str(p.resolve())} for p in files])
            # Reading asks for no CPU of its own: the embedders hold every CPU Ray has,
            # and a read that waited for one would never run (it shares the cores as it
            # would in-process).
            users = paths.flat_map(
                lambda row: read_histories(Path(row["path"]), repository),
                num_cpus=0,
                compute=ray.data.TaskPoolStrategy(size=min(options.workers, len(files))),
            )
            embedded = users.map_batches(
                Embedder,
                fn_constructor_kwargs={"repository": str(repository), "k": options.k},
                batch_size=options.batch_users,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=options.workers),
                num_cpus=1,
            )
            embedded.write_parquet(str(staging), ray_remote_args={"num_cpus": 0})  # as reading
            seconds = time.monotonic() - started
            written = sum(_rows(f) for f in staging.rglob("*.parquet"))
    except BaseException as exc:
        if own := _own_error(exc):  # a worker's error of ours, e.g. a bad events line
            raise type(own)(str(own).splitlines()[0]) from None  # without Ray's advice
        raise
    finally:
        if started_ray:
            ray.shutdown()
    return EmbedAllResult(written, len(files), seconds, out)


@contextlib.contextmanager
def _ray_data_quiet(unless: bool) -> Iterator[None]:
    """Ray Data's log lines and advice off (unless `dynemb -v`): an execution plan,
    progress as log lines when stderr is no terminal, warnings that a pool of 2 had one
    file to read, and on a failed task its error logged with a traceback of 80 lines
    before the exception reaches us (which `embed_all` reports as one line, or raises
    whole if it is not ours). A terminal still gets Ray's progress bars."""
    if unless:
        yield
        return
    logger = logging.getLogger("ray.data")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data")
            yield
    finally:
        logger.setLevel(level)


def check_out_dir(out: Path, events: Path, repository: Path) -> None:
    """OUT is replaced whole: it must be a folder (or nothing yet) with a name of its own
    that neither is nor holds the events or the model repository (--overwrite deleted an
    events folder given as OUT, and would have deleted a repository), nor lies inside the
    repository (Triton would take it for a model)."""
    target, here = out.resolve(), Path.cwd().resolve()
    if target.parent == target or target == here or target in here.parents:
        raise UsageError(f"{out}: OUT is replaced whole; name a folder of its own")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; OUT is a folder of Parquet files")
    for what, path in (("events", events.resolve()), ("model repository", repository)):
        if target == path or target in path.parents:
            raise UsageError(f"{out}: OUT would replace the {what} {path}; pick another folder")
    if repository in target.parents:
        raise UsageError(
            f"{out}: OUT must be outside the model repository {repository} "
            "(Triton would take a folder there for a model)"
        )


def _own_error(exc: BaseException) -> DynembError | None:
    """The DynembError a Ray task raised, out of the Ray exceptions wrapping it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, DynembError) and type(current).__module__.startswith("dynemb"):
            return current
        current = getattr(current, "cause", None) or current.__cause__
    return None


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def read_embeddings(out: Path) -> dict[str, np.ndarray]:
    """user -> E_t from an embed-all output directory."""
    import pyarrow.parquet as pq

    table = pq.read_table(out)
    return {
        u: np.asarray(e, dtype=np.float32)
        for u, e in zip(
            table.column("user").to_pylist(), table.column("embedding").to_pylist(), strict=True
        )
    }
