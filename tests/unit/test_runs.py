"""Finished runs of an interrupted benchmark are kept and found again only by the same
task, code and data; a full disk or a torn entry costs the resume, never the benchmark."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from dynemb.data.synthetic import SyntheticConfig, generate
from dynemb.evaluation import quality
from dynemb.evaluation.quality import DynembRun, QualityOptions, quality_benchmark
from dynemb.evaluation.runs import RunStore, data_fingerprint, run_all, run_tasks
from dynemb.evaluation.streaming import StreamingOptions, StreamingSeed, streaming_benchmark
from dynemb.training.train import TrainOptions

TINY = TrainOptions(max_minutes=1.0, max_epochs=1, batch_size=8, llm_layers=1, progress=False)


@dataclass(frozen=True)
class Square:
    n: int
    out: Path | None = None  # a file the task writes, as a checkpoint is

    def writes(self) -> tuple[Path, ...]:
        return (self.out,) if self.out is not None else ()

    def __call__(self) -> int:
        if self.out is not None:
            self.out.write_text(f"square of {self.n}", encoding="utf-8")
        return self.n * self.n


@dataclass(frozen=True)
class SlowOrFailing:
    """A task for worker processes: sleeps, then fails or multiplies the data by 3."""

    seconds: float
    fail: bool = False

    def __call__(self, data: int) -> int:
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("run failed")
        return 3 * data


def interrupted_at_seed(monkeypatch, task_type, seed: int, benchmark, *args) -> None:
    """`benchmark(*args)` cut short by Ctrl-C when its `task_type` run of `seed` starts."""
    call = task_type.__call__

    def cut(self, data):
        if self.train.seed == seed:
            raise KeyboardInterrupt
        return call(self, data)

    with monkeypatch.context() as m:
        m.setattr(task_type, "__call__", cut)
        with pytest.raises(KeyboardInterrupt):
            benchmark(*args)


def in_order(calls: list[int], stop_after: int | None = None):
    """A `run` for run_all that runs tasks in this process, noting each, and is cut short
    (as by Ctrl-C) after `stop_after` of them."""

    def run(todo):
        for i, task in enumerate(todo):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt
            calls.append(task.n)
            yield i, task()

    return run


def test_an_interrupted_benchmark_trains_again_only_what_had_not_finished(tmp_path):
    tasks = [Square(n) for n in (2, 3, 4)]
    calls: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        run_all(tasks, in_order(calls, stop_after=2), RunStore(tmp_path, "scope"))
    assert calls == [2, 3]

    calls.clear()
    store = RunStore(tmp_path, "scope")
    assert run_all(tasks, in_order(calls), store) == [4, 9, 16]
    assert calls == [4] and store.reused == 2

    store.clear()
    assert not list(tmp_path.iterdir())
    calls.clear()
    assert run_all(tasks, in_order(calls), RunStore(tmp_path, "scope")) == [4, 9, 16]
    assert calls == [2, 3, 4]  # written and cleared: a new invocation trains everything


def test_a_run_is_found_only_by_the_same_task_code_and_data(tmp_path):
    RunStore(tmp_path, "code-a data-a").put(Square(2), 4)
    assert RunStore(tmp_path, "code-a data-a").get(Square(2)) == (True, 4)
    assert RunStore(tmp_path, "code-b data-a").get(Square(2)) == (False, None)
    assert RunStore(tmp_path, "code-a data-a").get(Square(3)) == (False, None)
    assert RunStore(tmp_path, "code-a data-a", resume=False).get(Square(2)) == (False, None)

    data = generate(SyntheticConfig(n_users=4, items_per_category=2)).dataset
    same = generate(SyntheticConfig(n_users=4, items_per_category=2)).dataset
    other = generate(SyntheticConfig(n_users=5, items_per_category=2)).dataset
    assert data_fingerprint(data) == data_fingerprint(same) != data_fingerprint(other)


def test_the_files_a_run_wrote_come_back_with_it(tmp_path):
    out = tmp_path / "model.pt"
    task = Square(5, out)
    assert run_all([task], in_order([]), RunStore(tmp_path / "runs", "s")) == [25]
    out.write_text("overwritten by a later run", encoding="utf-8")
    calls: list[int] = []
    assert run_all([task], in_order(calls), RunStore(tmp_path / "runs", "s")) == [25]
    assert calls == [] and out.read_text(encoding="utf-8") == "square of 5"


def test_a_run_is_the_same_whatever_the_terminal_or_where_its_checkpoint_goes(tmp_path):
    """A progress bar (on when stderr is a terminal and one worker trains) changes no
    result, nor does the checkpoint's path: a run resumed under nohup, with --workers 2 or
    another --checkpoint is found, and its checkpoint lands where it is asked for now."""
    store = RunStore(tmp_path / "runs", "s")
    first = DynembRun(replace(TINY, progress=True), first=True, checkpoint=tmp_path / "a.pt")
    (tmp_path / "a.pt").write_bytes(b"weights")
    store.put(first, "row")
    moved = DynembRun(TINY, first=True, checkpoint=tmp_path / "elsewhere" / "b.pt")
    assert RunStore(tmp_path / "runs", "s").get(moved) == (True, "row")
    assert (tmp_path / "elsewhere" / "b.pt").read_bytes() == b"weights"
    for other in (DynembRun(TINY, first=True), DynembRun(replace(TINY, seed=1), first=True)):
        assert RunStore(tmp_path / "runs", "s").get(other)[0] is False


def test_a_failed_run_in_a_worker_keeps_the_others_finished_beside_it(tmp_path):
    """Two workers: the run that fails is raised only after the run beside it (still
    training when the failure came back) has finished and been kept."""
    store = RunStore(tmp_path, "s")
    tasks = [SlowOrFailing(0.0, fail=True), SlowOrFailing(3.0)]
    with pytest.raises(RuntimeError, match="run failed"):
        run_tasks(7, tasks, workers=2, store=store)
    assert RunStore(tmp_path, "s").get(tasks[1]) == (True, 21)


def test_a_full_disk_costs_the_resume_not_the_benchmark(tmp_path, monkeypatch, caplog):
    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with caplog.at_level(logging.WARNING, logger="dynemb.evaluation.runs"):
        assert run_all([Square(2)], in_order([]), RunStore(tmp_path, "s")) == [4]
    assert "No space left on device" in caplog.text
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.pkl")) and RunStore(tmp_path, "s").get(Square(2))[0] is False


def test_an_unreadable_entry_is_trained_again(tmp_path):
    store = RunStore(tmp_path, "s")
    store.put(Square(2), 4)
    (tmp_path / f"{store.key(Square(2))}.pkl").write_bytes(b"not a pickle")
    calls: list[int] = []
    assert run_all([Square(2)], in_order(calls), RunStore(tmp_path, "s")) == [4]
    assert calls == [2]


def test_the_quality_benchmark_resumes_after_an_interruption(tmp_path, monkeypatch):
    """Cut short in its baseline, the benchmark kept the dynemb run and its checkpoint; run
    again it trains only the baseline, says so in its record, gives the numbers of one
    uninterrupted run and leaves nothing behind."""
    config = SyntheticConfig(n_users=12, items_per_category=4, events_per_user=(8, 12))
    data = generate(replace(config, n_categories=3)).dataset
    options = QualityOptions(
        data="synthetic",
        seeds=(0,),
        train=TINY,
        ablations=False,
        cold_items=False,
        out_dir=tmp_path / "results",
        stem="q",
        checkpoint=tmp_path / "seed0.pt",
        runs_dir=tmp_path / "runs",
    )
    whole = quality_benchmark(data, replace(options, runs_dir=tmp_path / "other"))
    (tmp_path / "seed0.pt").unlink()

    def interrupted(self, dataset):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(quality.SasrecRun, "__call__", interrupted)
        with pytest.raises(KeyboardInterrupt):
            quality_benchmark(data, options)
    assert len(list((tmp_path / "runs").glob("*.pkl"))) == 1
    (tmp_path / "seed0.pt").unlink()

    trained: list[int] = []
    fit = quality.fit
    monkeypatch.setattr(quality, "fit", lambda *a: trained.append(1) or fit(*a))
    result = quality_benchmark(data, options)
    assert trained == [] and result.run.resumed_runs == 1
    assert (tmp_path / "seed0.pt").is_file()
    assert "resumed: 1 run was" in (tmp_path / "results" / "q.md").read_text(encoding="utf-8")
    for name in ("dynemb", "SASRec-CE"):
        assert [r.test for r in result.models[name].runs] == [
            r.test for r in whole.models[name].runs
        ]
    assert not list((tmp_path / "runs").iterdir())


def test_the_sessions_quality_benchmark_resumes_after_an_interruption(tmp_path, monkeypatch):
    """Seed 0 finished before the interruption: run again, only seed 1 trains, and the
    result is an uninterrupted run's."""
    config = SyntheticConfig(n_users=10, items_per_category=6, events_per_user=(54, 60))
    data = generate(replace(config, n_categories=3)).dataset
    options = StreamingOptions(
        seeds=(0, 1),
        blocks=(10, 50),
        train=TINY,
        out_dir=tmp_path / "results",
        stem="s",
        runs_dir=tmp_path / "runs",
    )
    whole = streaming_benchmark(data, replace(options, runs_dir=tmp_path / "other"))
    assert whole.users_past_window > 0 and whole.run.resumed_runs == 0

    interrupted_at_seed(monkeypatch, StreamingSeed, 1, streaming_benchmark, data, options)
    seeds: list[int] = []
    call = StreamingSeed.__call__
    monkeypatch.setattr(
        StreamingSeed, "__call__", lambda self, d: seeds.append(self.train.seed) or call(self, d)
    )
    result = streaming_benchmark(data, options)
    assert seeds == [1] and result.run.resumed_runs == 1
    assert [replace(r, train_seconds=0) for r in result.runs] == [
        replace(r, train_seconds=0) for r in whole.runs
    ]
    assert result.users_past_window == whole.users_past_window
    assert not list((tmp_path / "runs").iterdir())
