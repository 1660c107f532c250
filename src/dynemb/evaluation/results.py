"""Typed records of the quality, baseline and dynamics benchmarks.

Each benchmark returns one of these and writes it as JSON (`to_json`, the dataclasses'
fields as nested objects) beside a Markdown report rendered from the same record; tests
assert on the records, never on printed text. Metric tables stay mappings from the
metric's name ("ndcg@10", "recall@20", ...) to its value: that is what they are.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynemb.evaluation.metrics import (
    DEFAULT_KS,
    ndcg_per_user,
    ranking_metrics,
    summarize_runs,
    target_ranks,
)
from dynemb.manifest import git_commit

Metrics = dict[str, float]


@dataclass
class SeenMetrics:
    """Test metrics with already-seen items kept in the ranking and excluded from it."""

    kept: Metrics
    excluded: Metrics
    # Each user's NDCG@10 with seen items excluded, in the order scored (the bootstrap
    # interval of a ratio between models resamples them).
    ndcg10_per_user: list[float] | None = None

    @classmethod
    def from_scores(
        cls, scores: np.ndarray, targets: np.ndarray, histories, ks=DEFAULT_KS
    ) -> SeenMetrics:
        """Full-ranking metrics of `scores` (rows = users) against `targets`, with the
        `histories` kept in the ranking and excluded from it."""
        excluded = target_ranks(scores, targets, histories)
        return cls(
            kept=ranking_metrics(target_ranks(scores, targets), ks),
            excluded=ranking_metrics(excluded, ks),
            ndcg10_per_user=[round(float(v), 6) for v in ndcg_per_user(excluded, 10)],
        )

    def of(self, seen: str) -> Metrics:
        if seen not in ("kept", "excluded"):
            raise ValueError(f"seen must be 'kept' or 'excluded', got {seen!r}")
        return self.kept if seen == "kept" else self.excluded


@dataclass
class SliceResult:
    """A cold-start slice: how many users it has, and its metrics if it could be scored."""

    users: int
    test: SeenMetrics | None = None


@dataclass
class RunResult:
    """One trained model (one seed), read once on test."""

    test: SeenMetrics
    seed: int | None = None  # None: a model without training (MostPop)
    best_epoch: int | None = None
    epochs: int | None = None
    examples: int | None = None
    train_seconds: float | None = None
    seconds_per_epoch: list[float] = field(default_factory=list)
    valid_ndcg10: float | None = None
    cold_start: dict[str, SliceResult] = field(default_factory=dict)


@dataclass
class ModelResult:
    runs: list[RunResult]
    config: dict[str, Any] | None = None  # the model's configuration, as recorded
    budget_minutes: float | None = None  # ablations: the budget of each run
    max_epochs: int | None = None
    seconds: float | None = None

    def summary(self, seen: str = "excluded") -> dict[str, tuple[float, float]]:
        """Mean and sample std over the runs, per metric."""
        return summarize_runs([run.test.of(seen) for run in self.runs])


@dataclass
class RunRecord:
    """What produced a result: the command, the code and the machine."""

    command: str
    git_commit: str
    machine: dict[str, Any]
    total_seconds: float = 0.0  # this process's; runs it resumed took their time before
    resumed_runs: int = 0  # runs an interrupted earlier process of the same code finished

    @classmethod
    def now(cls, command: str) -> RunRecord:
        return cls(command, git_commit(dirty_flag=True), machine())


@dataclass
class ColdItemResult:
    """The cold-item slice: a fixed share of items withheld from training (no event of
    theirs trains anything, no id row is learned for them), read on the users whose test
    target is one of them, every item ranked."""

    fraction: float
    items: int  # withheld items
    users: int  # evaluated users whose test target is withheld
    dynemb: list[RunResult]  # per seed: test = the slice's metrics
    dynemb_all_users: list[SeenMetrics]  # the same models on every evaluated user
    most_pop: SeenMetrics  # popularity in the same withheld training data
    sasrec: str = "cannot score them: an id-only model has no trained row for an item it never saw"


@dataclass
class QualityResult:
    data: str
    synthetic: bool
    protocol: str
    query_time: str
    users: int
    evaluated_users: int
    items: int
    seeds: list[int]
    train_options: dict[str, Any]
    models: dict[str, ModelResult]
    run: RunRecord
    cold_items: ColdItemResult | None = None
    # 95% bootstrap interval of dynemb / SASRec-CE NDCG@10, seen excluded (over seeds and
    # users: `metrics.ratio_interval`).
    ratio_interval: tuple[float, float] | None = None

    def ratio(self, metric: str, model: str = "dynemb", baseline: str = "SASRec-CE") -> float:
        """mean(model) / mean(baseline) of `metric`, seen items excluded."""
        return self.models[model].summary()[metric][0] / self.models[baseline].summary()[metric][0]


@dataclass
class DynamicsMethod:
    recall10: float
    ndcg10: float
    top10_new_interest_share: float


@dataclass
class DynamicsRun:
    seed: int
    train_seconds: float
    probes: int
    methods: dict[str, DynamicsMethod]  # "fresh E_t", "stale E_t", "static mean"


@dataclass
class DynamicsResult:
    data: str
    config: str
    protocol: str
    held_out_users: int
    after: list[int]
    stale_hours: float
    seeds: list[int]
    runs: list[DynamicsRun]
    run: RunRecord


def as_record(options: Any) -> dict[str, Any]:
    """A dataclass of options as the JSON record stores it (values it cannot hold as
    strings), so that the record read back equals the one written."""
    return json.loads(json.dumps(asdict(options), default=str))


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def save_report(result: Any, out_dir: Path, stem: str, md: list[str]) -> None:
    """Write `stem`.json (the record) and `stem`.md (`md` plus the run's context), UTF-8."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(result), indent=1, default=str) + "\n"
    (out_dir / f"{stem}.json").write_text(text, encoding="utf-8")
    run: RunRecord = result.run
    context = [
        f"- command: `{run.command}`",
        f"- git commit: {run.git_commit}",
        f"- machine: {run.machine}",
    ]
    if isinstance(result, QualityResult):
        context.append(f"- training options: `{result.train_options}`")
    context.append(f"- total wall-clock: {run.total_seconds} s")
    if run.resumed_runs:
        runs = "1 run was" if run.resumed_runs == 1 else f"{run.resumed_runs} runs were"
        context.append(
            f"- resumed: {runs} finished by an earlier, interrupted process of the same "
            "command, code and data (their own seconds are in their rows)"
        )
    (out_dir / f"{stem}.md").write_text("\n".join([*md, *context]) + "\n", encoding="utf-8")
