"""The synthetic dynamics benchmark end to end on a tiny data set: every method scored on the
same held-out probes, the record, report and trajectory plot written, and the criterion
read from the record."""

from __future__ import annotations

import json

from dynemb.data.synthetic import SyntheticConfig
from dynemb.evaluation.dynamics import (
    METHODS,
    DynamicsOptions,
    criterion_met,
    dynamics_benchmark,
    margin_over,
)
from dynemb.training.train import TrainOptions


def test_the_dynamics_benchmark_scores_every_method_on_the_same_probes(tmp_path):
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
