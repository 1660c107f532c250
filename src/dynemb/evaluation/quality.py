"""Quality of trained embeddings on the leave-one-out protocol, next to the baselines.

Protocol (the same as dynemb.evaluation.baselines): each user's events in time order; the
last is the test target, the second-last the validation target, the rest training
(`leave_one_out`). Every item is ranked (full ranking, pessimistic ties), metrics are
averaged over evaluated users, reported with already-seen items kept and excluded, and
summarised as mean ± sample std over the seeds fixed before running. Models select their
epoch on validation NDCG@10 only; test is read once per trained model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from dynemb.data.types import Dataset
from dynemb.evaluation.metrics import evaluate_scores, format_mean_std
from dynemb.evaluation.results import (
    ModelResult,
    QualityResult,
    RunRecord,
    RunResult,
    SeenMetrics,
    SliceResult,
    as_record,
    save_report,
)
from dynemb.evaluation.split import Split, Which, leave_one_out
from dynemb.paths import RESULTS_DIR
from dynemb.training.model import Variant
from dynemb.training.train import Trained, TrainOptions, fit, scores_for

logger = logging.getLogger(__name__)

COLUMNS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr@10")
ABLATIONS: dict[str, Variant] = {
    "no time features": Variant(time_features=False),
    "no LLM encoder (mean pool)": Variant(encoder="mean"),
    "no text": Variant(text=False),
    "no labels": Variant(labels=False),
    "no item ids": Variant(item_ids=False),
}
QUERY_TIME_NOTE = "t = time of the target event (history: events before it, at or before t)"
COLD_HISTORY = 5  # "short history": only the newest 5 events are sent
RARE_ITEM = 5  # "cold item": at most this many training interactions


def evaluate(
    trained: Trained, which: Which = "test", users: np.ndarray | None = None, **kw
) -> SeenMetrics:
    """Full-ranking metrics of `which`, with seen items kept and excluded.

    Keywords go to `scores_for` (`with_ids=False` scores against content-only item vectors,
    `limit=k` sends only the newest k events).
    """
    split = trained.split
    users = split.eval_users if users is None else np.asarray(users)
    scores = scores_for(trained.model, trained.builder, which, users, **kw)
    targets = (split.valid if which == "valid" else split.test)[users]
    histories = [split.history(int(u), which) for u in users]
    return SeenMetrics(
        kept=evaluate_scores(scores, targets), excluded=evaluate_scores(scores, targets, histories)
    )


def cold_start(trained: Trained) -> dict[str, SliceResult]:
    """Short histories (newest 5 events only), and rare / id-less items (content only)."""
    split = trained.split
    counts = np.zeros(split.n_items + 1, np.int64)
    for seq in split.train:
        np.add.at(counts, seq, 1)
    users = split.eval_users
    rare = users[counts[split.test[users]] <= RARE_ITEM]
    out = {
        f"history <= {COLD_HISTORY} events (all test users, newest {COLD_HISTORY} sent)": (
            SliceResult(len(users), evaluate(trained, users=users, limit=COLD_HISTORY))
        ),
        f"users with <= {COLD_HISTORY} training events": SliceResult(
            int(sum(len(split.train[u]) <= COLD_HISTORY for u in users))
        ),
        f"target item with <= {RARE_ITEM} training interactions": SliceResult(
            len(rare), evaluate(trained, users=rare) if len(rare) else None
        ),
    }
    if trained.options.variant.item_ids:
        out["all item id rows withheld (content-only item table)"] = SliceResult(
            len(users), evaluate(trained, with_ids=False)
        )
        if len(rare):
            out["rare target items, id rows withheld"] = SliceResult(
                len(rare), evaluate(trained, users=rare, with_ids=False)
            )
    return out


@dataclass
class QualityOptions:
    data: str = "ml-100k"
    seeds: tuple[int, ...] = (0, 1, 2)
    train: TrainOptions = field(default_factory=TrainOptions)
    ablation_minutes: float | None = None  # budget of each ablation run (seed 0 only)
    ablation_epochs: int | None = None  # their epochs (the cosine schedule's length)
    ablations: bool = True
    baselines: bool = True
    out_dir: Path = RESULTS_DIR
    stem: str = "quality-ml100k"
    checkpoint: Path | None = None  # save seed 0's checkpoint here
    command: str = ""


def run_result(trained: Trained) -> RunResult:
    """A trained dynemb model's row: its training run and its test metrics."""
    return RunResult(
        test=evaluate(trained),
        seed=trained.options.seed,
        best_epoch=trained.best_epoch,
        epochs=len(trained.epochs),
        examples=sum(e.examples for e in trained.epochs),
        train_seconds=round(trained.seconds, 1),
        seconds_per_epoch=[round(e.seconds, 1) for e in trained.epochs],
        valid_ndcg10=trained.best_valid_ndcg10,
    )


def quality_benchmark(dataset: Dataset, options: QualityOptions) -> QualityResult:
    """Train dynemb per seed (plus ablations and baselines), evaluate on test, write results."""
    started = time.perf_counter()
    run = RunRecord.now(options.command)
    split = leave_one_out(dataset)
    models: dict[str, ModelResult] = {}
    builder = None
    runs = []
    for seed in options.seeds:
        trained = fit(dataset, split, replace(options.train, seed=seed), builder=builder)
        builder = trained.builder
        row = run_result(trained)
        if seed == options.seeds[0]:
            row.cold_start = cold_start(trained)
            if options.checkpoint is not None:
                trained.checkpoint(dataset).save(options.checkpoint)
        runs.append(row)
        logger.info("dynemb seed %d: %s", seed, row.test.excluded)
    models["dynemb"] = ModelResult(runs)
    if options.baselines:
        models.update(baseline_models(split, options.seeds))
    if options.ablations:
        models.update(ablation_models(dataset, split, options, builder))
    run.total_seconds = round(time.perf_counter() - started, 1)
    result = QualityResult(
        data=dataset.name,
        synthetic=dataset.synthetic,
        protocol=__doc__.split("\n\n", 1)[1].strip(),
        query_time=QUERY_TIME_NOTE,
        users=split.n_users,
        evaluated_users=len(split.eval_users),
        items=split.n_items,
        seeds=list(options.seeds),
        train_options=as_record(options.train),
        models=models,
        run=run,
    )
    save_report(result, options.out_dir, options.stem, render_markdown(result))
    return result


def ablation_models(
    dataset: Dataset, split: Split, options: QualityOptions, builder
) -> dict[str, ModelResult]:
    """Each ablation variant trained once (the first seed) under the same budget."""
    budget = options.ablation_minutes or options.train.max_minutes
    seed = options.seeds[0]
    out = {}
    for name, variant in {"full (same budget)": Variant(), **ABLATIONS}.items():
        opts = replace(
            options.train,
            seed=seed,
            variant=variant,
            max_minutes=budget,
            max_epochs=options.ablation_epochs or options.train.max_epochs,
        )
        trained = fit(dataset, split, opts, builder=builder)
        row = run_result(trained)
        out[f"ablation: {name}"] = ModelResult(
            [row], budget_minutes=budget, max_epochs=opts.max_epochs
        )
        logger.info("ablation %s: %s", name, row.test.excluded)
    return out


def baseline_models(split: Split, seeds: Sequence[int]) -> dict[str, ModelResult]:
    """MostPop and the tuned SASRec-CE, on the same split."""
    from dynemb.evaluation.baselines import TUNED_SASREC, most_popular_metrics, run_sasrec_seeds

    t0 = time.perf_counter()
    sasrec = run_sasrec_seeds(split, TUNED_SASREC, seeds)
    return {
        "MostPop": ModelResult([RunResult(test=most_popular_metrics(split))]),
        "SASRec-CE": ModelResult(
            sasrec, config=asdict(TUNED_SASREC), seconds=round(time.perf_counter() - t0, 1)
        ),
    }


def _table(models: dict[str, ModelResult]) -> list[str]:
    lines = [
        "| model | seen items | runs | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for seen in ("excluded", "kept"):
        for name, model in models.items():
            summary = model.summary(seen)
            cells = [format_mean_std(*summary[c]) for c in COLUMNS]
            lines.append(f"| {name} | {seen} | {len(model.runs)} | " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: QualityResult) -> list[str]:
    models = result.models
    main = {k: v for k, v in models.items() if not k.startswith("ablation")}
    ablations = {k: v for k, v in models.items() if k.startswith("ablation")}
    md = [
        f"# Next-item quality on {result.data}" + (" (SYNTHETIC data)" if result.synthetic else ""),
        "",
        f"{result.users} users ({result.evaluated_users} evaluated), "
        f"{result.items} items. Seeds {result.seeds} fixed in advance; mean ± std.",
        "",
        "## Protocol",
        "",
        result.protocol,
        "",
        f"Query time: {result.query_time}.",
        "",
        "## Test results",
        "",
        *_table(main),
    ]
    if "dynemb" in main and "SASRec-CE" in main:
        md += [
            "",
            f"dynemb / SASRec-CE (seen excluded): NDCG@10 {result.ratio('ndcg@10'):.3f}×, "
            f"Recall@10 {result.ratio('recall@10'):.3f}× (target: ≥ 1.10× NDCG@10).",
        ]
    if ablations:
        first = next(iter(ablations.values()))
        md += [
            "",
            f"## Ablations (seed {result.seeds[0]}, {first.max_epochs} epochs or "
            f"{first.budget_minutes} min each)",
            "",
            *_table(ablations),
        ]
    dyn = models["dynemb"].runs if "dynemb" in models else []
    if dyn and dyn[0].cold_start:
        md += ["", f"## Cold start (dynemb seed {dyn[0].seed})", ""]
        md += ["| slice | users | seen items | " + " | ".join(COLUMNS) + " |"]
        md += ["|---|---|---|" + "---|" * len(COLUMNS)]
        for name, part in dyn[0].cold_start.items():
            if part.test is None:
                md.append(f"| {name} | {part.users} | – |" + " – |" * len(COLUMNS))
                continue
            for seen in ("excluded", "kept"):
                cells = [f"{part.test.of(seen)[c]:.4f}" for c in COLUMNS]
                md.append(f"| {name} | {part.users} | {seen} | " + " | ".join(cells) + " |")
    md += ["", "## Runs", "", "| model | seed | best epoch | epochs | train s | valid NDCG@10 |"]
    md += ["|---|---|---|---|---|---|"]
    for name, model in models.items():
        for r in model.runs:
            if r.seed is not None:
                md.append(
                    f"| {name} | {r.seed} | {r.best_epoch} | {r.epochs or ''} | "
                    f"{r.train_seconds} | {r.valid_ndcg10:.4f} |"
                )
    md += ["", "## Context", ""]
    return md
