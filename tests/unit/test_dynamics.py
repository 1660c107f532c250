"""The synthetic dynamics benchmark end to end on a tiny data set: every method scored on the
same held-out probes, the record, report and trajectory plot written, the criterion read
from the record, and a run cut short resumed."""

from __future__ import annotations

import json
from dataclasses import replace

from dynemb.data.synthetic import SyntheticConfig
from dynemb.evaluation.dynamics import (
    METHODS,
    DynamicsOptions,
    DynamicsSeed,
    criterion_met,
    dynamics_benchmark,
    margin_over,
)
from dynemb.training.train import TrainOptions
from tests.unit.test_runs import interrupted_at_seed


def test_the_dynamics_benchmark_scores_every_method_on_the_same_probes(tmp_path, monkeypatch):
    options = DynamicsOptions(
        data=SyntheticConfig(
            n_categories=3, items_per_category=4, n_users=15, events_per_user=(12, 16)
        ),
        seeds=(0, 1),
        train=TrainOptions(
            max_minutes=1.0, max_epochs=1, batch_size=8, llm_layers=1, progress=False
        ),
        out_dir=tmp_path,
        stem="d",
        runs_dir=tmp_path / "runs",
    )
    result = dynamics_benchmark(options)
    assert [r.seed for r in result.runs] == [0, 1] and result.held_out_users == 3
    for run in result.runs:
        assert run.probes > 0 and set(run.methods) == set(METHODS)
        for method in run.methods.values():
            assert 0.0 <= method.ndcg10 <= method.recall10 <= 1.0
            assert 0.0 <= method.top10_new_interest_share <= 1.0
    margins = [
        r.methods["fresh E_t"].recall10 - r.methods["static mean"].recall10 for r in result.runs
    ]
    mean, std = margin_over(result, "static mean")
    assert abs(mean - sum(margins) / 2) < 1e-12 and std >= 0.0
    assert isinstance(criterion_met(result), bool)
    record = json.loads((tmp_path / "d.json").read_text(encoding="utf-8"))
    assert [r["seed"] for r in record["runs"]] == [0, 1]
    assert "SYNTHETIC" in (tmp_path / "d.md").read_text(encoding="utf-8")
    assert (tmp_path / "d.png").stat().st_size > 0

    # Cut short at seed 1, then run again: seed 0 (and its plot) come from the first try.
    again = replace(options, out_dir=tmp_path / "again")
    interrupted_at_seed(monkeypatch, DynamicsSeed, 1, dynamics_benchmark, again)
    (tmp_path / "again" / "d.png").unlink()
    resumed = dynamics_benchmark(again)
    assert resumed.run.resumed_runs == 1 and (tmp_path / "again" / "d.png").stat().st_size > 0
    assert [replace(r, train_seconds=0) for r in resumed.runs] == [
        replace(r, train_seconds=0) for r in result.runs
    ]
    assert not list((tmp_path / "runs").iterdir())
