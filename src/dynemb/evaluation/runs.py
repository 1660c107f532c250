"""The training runs of a benchmark, as tasks: run in this process or in worker processes,
and each finished run kept on disk until the benchmark's report is written, so that a
benchmark cut short (Ctrl-C, a killed job, a full disk, a crash in run 9 of 12) loses only
the runs that had not finished: the quality record trains 14 models over about 95 minutes
here, the sessions-quality one 3 over 50.

A task is a frozen dataclass called with the data set. A run is found again only by the
same task (`identity()`, else its repr: seed, every training option that changes the
result, variant), the same data (a hash of the data set) and the same code (a hash of
every source file of `dynemb` and `dynemb_client`, of the pretrained MiniLM's files, and
the versions of the libraries that compute), taken when the benchmark starts. Training
is deterministic given those as long as it ends by its epoch count: a run stopped by its
wall-clock budget depends on the machine's speed, resumed or not. The benchmark deletes
its entries once its report is written; what stays behind is only ever the finished part
of an unfinished benchmark (or of one whose options changed: `rm -rf .cache/dynemb/runs`
drops them).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def code_fingerprint() -> str:
    """A hash of what trains and scores: every .py file of the two packages, the pretrained
    MiniLM's files (weights, config, tokenizer), and the versions of torch, numpy,
    transformers and tokenizers."""
    import numpy
    import tokenizers
    import torch
    import transformers

    import dynemb
    import dynemb_client
    from dynemb.stages.llm_encoder import minilm_path

    h = hashlib.sha256()
    for package in (dynemb, dynemb_client):
        root = Path(package.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    minilm = minilm_path()
    for path in sorted(p for p in minilm.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(minilm)).encode())
        h.update(path.read_bytes())
    for module in (torch, numpy, transformers, tokenizers):
        h.update(f"{module.__name__}=={module.__version__}".encode())
    return h.hexdigest()


def data_fingerprint(data: Any) -> str:
    """A hash of the data set's content (its pickle: the same records give the same
    bytes)."""
    return hashlib.sha256(pickle.dumps(data, protocol=4)).hexdigest()


@dataclass
class RunStore:
    """Finished runs of one benchmark invocation's tasks, under `root`: `<key>.pkl` holds a
    task's result and `<key>.files/` the files it wrote (`writes`), restored on a hit.
    Writes go to a temporary name and are renamed: an entry is whole or absent."""

    root: Path
    scope: str  # code_fingerprint() + data_fingerprint(), computed once per benchmark
    resume: bool = True  # False: retrain everything (entries are still written)
    used: list[str] = field(default_factory=list)  # keys this benchmark read or wrote
    reused: int = 0  # runs taken from the store

    def key(self, task: Any) -> str:
        identity = task.identity() if hasattr(task, "identity") else repr(task)
        return hashlib.sha256(f"{self.scope}\n{identity}".encode()).hexdigest()[:32]

    def get(self, task: Any) -> tuple[bool, Any]:
        """(True, the result) of `task` if an earlier process finished it; its files are
        put back where the task writes them."""
        key = self.key(task)
        self.used.append(key)
        path = self.root / f"{key}.pkl"
        if not self.resume or not path.is_file():
            return False, None
        try:
            result = pickle.loads(path.read_bytes())
            for i, target in enumerate(writes(task)):
                _copy(self.root / f"{key}.files" / str(i), target)
        # What a torn or foreign file can raise on unpickling (writes are atomic and the key
        # holds the code, so neither is expected), or a kept file that cannot go back.
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as exc:
            logger.warning("finished run %s unusable (%s): training it again", key, exc)
            return False, None
        self.reused += 1
        logger.info("run %s taken from %s (finished by an earlier process)", key, self.root)
        return True, result

    def put(self, task: Any, result: Any) -> None:
        """Keep `task`'s result (and files). A failure to write (a full disk) is logged and
        costs only the resume: the benchmark goes on with the result in memory."""
        key = self.key(task)
        self.used.append(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for i, source in enumerate(writes(task)):
                _copy(source, self.root / f"{key}.files" / str(i))
            partial = self.root / f"{key}.pkl.partial"
            partial.write_bytes(pickle.dumps(result, protocol=4))
            partial.replace(self.root / f"{key}.pkl")
        except OSError as exc:
            logger.warning("could not keep finished run %s in %s: %s", key, self.root, exc)

    def others(self) -> int:
        """Kept runs that none of this benchmark's tasks so far is (another benchmark, or
        other options, code or data): not used here, and left alone."""
        mine = set(self.used)
        return sum(p.stem not in mine for p in self.root.glob("*.pkl"))

    def clear(self) -> None:
        """Drop this benchmark's entries (its report is written: nothing left to resume)."""
        for key in dict.fromkeys(self.used):
            (self.root / f"{key}.pkl").unlink(missing_ok=True)
            shutil.rmtree(self.root / f"{key}.files", ignore_errors=True)


def writes(task: Any) -> tuple[Path, ...]:
    """The files a task writes besides its result (a `writes()` method, if it has one)."""
    method = getattr(task, "writes", None)
    return tuple(method()) if method is not None else ()


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def run_all(
    tasks: Sequence[Any],
    run: Callable[[Sequence[Any]], Iterable[tuple[int, Any]]],
    store: RunStore | None,
) -> list[Any]:
    """Each task's result, in order: from `store` where an earlier process finished it,
    else from `run`, which gets the tasks still to do and yields (index among them,
    result) as each finishes, in any order; each is kept in `store` at once."""
    results: list[Any] = [None] * len(tasks)
    todo: list[int] = []
    for i, task in enumerate(tasks):
        found, result = store.get(task) if store is not None else (False, None)
        if found:
            results[i] = result
        else:
            todo.append(i)
    others = store.others() if store is not None else 0
    if others:
        logger.warning(
            "%d kept runs in %s are of other benchmarks, options, code or data and are not used "
            "(delete the folder to drop them)",
            others,
            store.root,
        )
    finished = run([tasks[i] for i in todo])
    try:
        for j, result in finished:
            results[todo[j]] = result
            if store is not None:
                store.put(tasks[todo[j]], result)
    finally:  # cut short here (Ctrl-C while a run is kept): stop what is still queued now
        close = getattr(finished, "close", None)
        if close is not None:
            close()
    return results


def quiet(options: Any) -> Any:
    """Training options as a task's identity holds them: `progress` only draws a bar (and
    follows whether stderr is a terminal), so it is left out."""
    return replace(options, progress=False)


def run_tasks(
    data: Any, tasks: Sequence[Any], workers: int = 1, store: RunStore | None = None
) -> list[Any]:
    """Each task's result on `data`, in order: from `store` where an interrupted earlier
    invocation finished it, else run here or in `workers` spawned processes."""
    return run_all(tasks, lambda todo: _finished(data, todo, workers), store)


def store_for(data: Any, resume: bool = True, root: Path | None = None) -> RunStore:
    """The store of a benchmark over `data` with this code, under `root` (None: the
    cache's `runs` folder)."""
    from dynemb.paths import cache_dir

    root = cache_dir() / "runs" if root is None else root
    return RunStore(root, code_fingerprint() + data_fingerprint(data), resume=resume)


def _finished(data: Any, tasks: Sequence[Any], workers: int) -> Iterator[tuple[int, Any]]:
    """(index, result) of each task as it finishes."""
    if workers <= 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            yield i, task(data)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    context = multiprocessing.get_context("spawn")  # not fork: torch's threads
    with ProcessPoolExecutor(workers, context, initializer=_hold, initargs=(data,)) as pool:
        futures = {pool.submit(_call, task): i for i, task in enumerate(tasks)}
        failed: BaseException | None = None
        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    result = future.result()
                except Exception as exc:  # a task's own error: raised once the others end
                    if failed is None:
                        failed = exc
                        for other in futures:  # those not yet handed to a worker
                            other.cancel()
                    continue
                yield futures[future], result  # kept before the next one is waited for
        except BaseException:  # Ctrl-C here, or the consumer's own error
            for future in futures:
                future.cancel()
            raise
        if failed is not None:
            raise failed


_DATA: Any = None


def _hold(data: Any) -> None:
    global _DATA
    _DATA = data


def _call(task: Any) -> Any:
    return task(_DATA)
