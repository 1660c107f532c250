"""`dynemb bench-embed-all`: the Ray job against the same work done in-process.

On one SYNTHETIC population (events files, each user's events in one file), in one run:
- in-process: `workers` processes, each the same `Embedder` over its share of the files
  in batches of 32 (reading included), no Ray: the compute limit of these cores;
- Ray: `dynemb embed-all` with `workers` actors on a local Ray of `workers` CPUs.
Both time the whole job after start-up (pipeline loading included, the Ray runtime's own
start excluded) and embed the same users; the ratio Ray / in-process is the target
(>= 0.8), and Ray's embeddings must equal the in-process ones (1e-4).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynemb.bench.context import RunContext, collect_context, context_markdown, write_results
from dynemb.bulk import BATCH_USERS, EmbedAllOptions, Embedder, embed_all, read_embeddings
from dynemb.bulk import read_histories as read_file

SYNTHETIC = "SYNTHETIC population (generated titles and labels, no images, 1-50 events)"
TARGET = 0.8
T0 = 1_700_000_000


def write_population(directory: Path, users: int, files: int, seed: int = 0) -> list[Path]:
    """`users` SYNTHETIC users over `files` JSON Lines files (each user in one file): 1-50
    events each, titles from a pool of 2,000 so that items repeat as in a catalogue."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    titles = [
        f"synthetic item {i} {rng.choice(['lamp', 'novel', 'film', 'shoe'])}" for i in range(2000)
    ]
    paths = [directory / f"events-{i:03d}.jsonl" for i in range(files)]
    handles = [p.open("w", encoding="utf-8") for p in paths]
    try:
        for u in range(users):
            t = T0 + rng.randrange(86_400)
            out = handles[u % files]
            for _ in range(rng.randint(1, 50)):
                t += rng.choice([60, 3_600, 86_400])
                event = {
                    "user": f"u{u}",
                    "time": t,
                    "text": rng.choice(titles),
                    "labels": [f"category:c{rng.randrange(12)}", f"rating:{rng.randint(1, 5)}"],
                }
                out.write(json.dumps(event) + "\n")
    finally:
        for handle in handles:
            handle.close()
    return paths


def _worker(files, repository, k, barrier, results) -> None:
    barrier.wait()
    started = time.time()
    embedder = Embedder(repository, k)
    users, sample = 0, {}
    for path in files:
        rows = read_file(Path(path), Path(repository))
        for at in range(0, len(rows), BATCH_USERS):
            chunk = rows[at : at + BATCH_USERS]
            batch = {key: _column([r[key] for r in chunk]) for key in chunk[0]}
            table = embedder(batch)
            users += table.num_rows
            if len(sample) < 500:
                for u, e in zip(
                    table.column("user").to_pylist(),
                    table.column("embedding").to_pylist(),
                    strict=True,
                ):
                    sample[u] = np.asarray(e, dtype=np.float32)
    results.put((started, time.time(), users, sample))


def _column(values: list) -> np.ndarray:
    """A 1-D object array (np.array would make equal-length lists a 2-D one)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def inprocess(files: list[Path], repository: Path, workers: int, k: int):
    """(seconds, users, sample of user -> E_t): `workers` processes over the files."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(workers), context.Queue()
    shares = [[str(f) for f in files[i::workers]] for i in range(workers)]
    processes = [
        context.Process(target=_worker, args=(s, str(repository), k, barrier, results), daemon=True)
        for s in shares
    ]
    for process in processes:
        process.start()
    collected = [results.get(timeout=3600) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    seconds = max(c[1] for c in collected) - min(c[0] for c in collected)
    sample = {u: e for c in collected for u, e in c[3].items()}
    return seconds, sum(c[2] for c in collected), sample


@dataclass
class BulkBenchOptions:
    repository: Path
    out_dir: Path
    work_dir: Path
    users: int = 20_000
    files: int = 16
    workers: int = 2
    k: int = 10
    stem: str = "embed_all"


@dataclass(frozen=True)
class BulkBenchResult:
    users: int
    files: int
    workers: int
    inprocess_seconds: float
    ray_seconds: float
    inprocess_users_per_s: float
    ray_users_per_s: float
    ray_over_inprocess: float
    compared_users: int
    max_abs_diff: float
    context: RunContext

    @property
    def targets(self) -> list[tuple[str, str, bool]]:
        return [
            (
                f"Ray >= {TARGET} x in-process on the same {self.workers} cores",
                f"{self.ray_over_inprocess:.2f} x",
                self.ray_over_inprocess >= TARGET,
            ),
            (
                "embeddings equal the in-process ones (1e-4)",
                f"max diff {self.max_abs_diff:.1e} over {self.compared_users} users",
                self.max_abs_diff <= 1e-4,
            ),
        ]


def bench_embed_all(options: BulkBenchOptions, say: Callable[[str], None] = print):
    context = collect_context(data=SYNTHETIC)
    if warning := context.load_warning():
        say(f"warning: {warning}")
    events = options.work_dir / "events"
    say(f"writing {options.users} SYNTHETIC users into {options.files} files under {events}")
    files = write_population(events, options.users, options.files)
    say(f"in-process: {options.workers} processes")
    seconds, users, sample = inprocess(files, options.repository, options.workers, options.k)
    say(f"  {users} users in {seconds:.1f} s ({users / seconds:.1f} users/s)")
    say(f"Ray: {options.workers} actors")
    job = embed_all(
        EmbedAllOptions(
            events,
            options.work_dir / "out",
            options.repository,
            k=options.k,
            workers=options.workers,
            overwrite=True,
        ),
        say=say,
    )
    say(f"  {job.users} users in {job.seconds:.1f} s ({job.users_per_s:.1f} users/s)")
    if job.users != users:
        raise RuntimeError(f"Ray wrote {job.users} users, in-process embedded {users}")
    embedded = read_embeddings(job.out)
    diff = max(float(np.abs(embedded[u] - e).max()) for u, e in sample.items())
    context.finish()
    result = BulkBenchResult(
        users=users,
        files=len(files),
        workers=options.workers,
        inprocess_seconds=seconds,
        ray_seconds=job.seconds,
        inprocess_users_per_s=users / seconds,
        ray_users_per_s=job.users_per_s,
        ray_over_inprocess=job.users_per_s / (users / seconds),
        compared_users=len(sample),
        max_abs_diff=diff,
        context=context,
    )
    write_results(options.out_dir / options.stem, result, context, markdown(result))
    return result


def markdown(r: BulkBenchResult) -> str:
    return (
        "\n".join(
            [
                "# Bulk embedding: Ray Data against the same work in-process",
                "",
                f"{r.users:,} users ({SYNTHETIC}) in {r.files} JSON Lines files; "
                f"{r.workers} workers, one CPU each, batches of {BATCH_USERS} users, top-10 "
                "items per user. In-process: that many processes, each the same `Embedder` over "
                "its share of the files. Ray: `dynemb embed-all` on a local Ray of "
                f"{r.workers} CPUs (reading, embedding, writing Parquet). Both timed from start "
                "of work to the last user written (pipeline loading included, Ray's own start-up "
                "excluded).",
                "",
                "| target | measured | met |",
                "|---|---|---|",
                *(f"| {n} | {m} | {'yes' if ok else '**no**'} |" for n, m, ok in r.targets),
                "",
                "| variant | seconds | users/s |",
                "|---|---:|---:|",
                f"| in-process, {r.workers} processes | {r.inprocess_seconds:.1f} | "
                f"{r.inprocess_users_per_s:.1f} |",
                f"| Ray Data, {r.workers} actors | {r.ray_seconds:.1f} | {r.ray_users_per_s:.1f} |",
                "",
                "## Context",
                "",
                context_markdown(r.context),
            ]
        )
        + "\n"
    )
