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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from dynemb.data.types import Dataset
from dynemb.evaluation.metrics import format_mean_std, ratio_interval
from dynemb.evaluation.results import (
    ColdItemResult,
    ModelResult,
    QualityResult,
    RunRecord,
    RunResult,
    SeenMetrics,
    SliceResult,
    as_record,
    save_report,
)
from dynemb.evaluation.runs import quiet, run_tasks, store_for
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
    "no pretrained text knowledge": Variant(pretrained_text=False),
}
QUERY_TIME_NOTE = "t = time of the target event (history: events before it, at or before t)"
COLD_HISTORY = 5  # "short history": only the newest 5 events are sent
RARE_ITEM = 5  # "rare item": at most this many training interactions
COLD_ITEM_FRACTION = 0.1  # the cold-item slice: this share of all items withheld from training
COLD_ITEM_SEED = 0  # which ones: drawn once, before any run
RATIO_TARGET = 1.20  # dynemb / SASRec-CE NDCG@10, seen excluded
RATIO_LOW_TARGET = 1.10  # the lower end of its 95% interval
CONTENT_TARGET = 2.0  # content-only item table / MostPop NDCG@10
CONTENT_ONLY = "all item id rows withheld (content-only item table)"


def evaluate(
    trained: Trained,
    which: Which = "test",
    users: np.ndarray | None = None,
    seen: str = "history",
    **kw,
) -> SeenMetrics:
    """Full-ranking metrics of `which`, with seen items kept and excluded.

    Keywords go to `scores_for` (`with_ids=False` scores against content-only item vectors,
    `limit=k` or one k per user sends only the newest k events). `seen` says which items
    the user has had: "history", every event before the target (a session that streamed
    the whole history but reads only its window has still had them all), or "sent", only
    the events sent (a user whose history is just those).
    """
    if seen not in ("history", "sent"):
        raise ValueError(f"seen must be 'history' or 'sent', got {seen!r}")
    split = trained.split
    users = split.eval_users if users is None else np.asarray(users)
    scores = scores_for(trained.model, trained.builder, which, users, **kw)
    targets = (split.valid if which == "valid" else split.test)[users]
    histories = [split.history(int(u), which) for u in users]
    limit = kw.get("limit")
    if seen == "sent" and limit is not None:
        limits = [limit] * len(users) if isinstance(limit, int) else list(limit)
        newest = trained.builder.newest  # what is sent
        histories = [newest(h, k) for h, k in zip(histories, limits, strict=True)]
    return SeenMetrics.from_scores(scores, targets, histories)


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
            SliceResult(len(users), evaluate(trained, users=users, limit=COLD_HISTORY, seen="sent"))
        ),
        f"users with <= {COLD_HISTORY} training events": SliceResult(
            int(sum(len(split.train[u]) <= COLD_HISTORY for u in users))
        ),
        f"target item with <= {RARE_ITEM} training interactions": SliceResult(
            len(rare), evaluate(trained, users=rare) if len(rare) else None
        ),
    }
    if trained.options.variant.item_ids:
        out[CONTENT_ONLY] = SliceResult(len(users), evaluate(trained, with_ids=False))
        if len(rare):
            out["rare target items, id rows withheld"] = SliceResult(
                len(rare), evaluate(trained, users=rare, with_ids=False)
            )
    return out


@dataclass
class QualityOptions:
    data: str = "ml-100k"
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    train: TrainOptions = field(default_factory=TrainOptions)
    ablation_minutes: float | None = None  # budget of each ablation run (seed 0 only)
    ablation_epochs: int | None = None  # their epochs (the cosine schedule's length)
    ablations: bool = True
    baselines: bool = True
    cold_item_seeds: tuple[int, ...] | None = None  # the cold-item slice's runs (None: 1st)
    cold_items: bool = True
    workers: int = 1  # training runs side by side, each in its own process
    out_dir: Path = RESULTS_DIR
    stem: str = "quality-ml100k"
    checkpoint: Path | None = None  # save seed 0's checkpoint here
    command: str = ""
    # Take runs that an interrupted invocation of the same benchmark finished (same code,
    # data and options: dynemb.evaluation.runs) from `runs_dir` (None: the cache's).
    resume: bool = True
    runs_dir: Path | None = None


def run_result(trained: Trained, test: SeenMetrics | None = None) -> RunResult:
    """A trained dynemb model's row: its training run and its test metrics."""
    return RunResult(
        test=evaluate(trained) if test is None else test,
        seed=trained.options.seed,
        best_epoch=trained.best_epoch,
        epochs=len(trained.epochs),
        examples=sum(e.examples for e in trained.epochs),
        train_seconds=round(trained.seconds, 1),
        seconds_per_epoch=[round(e.seconds, 1) for e in trained.epochs],
        valid_ndcg10=trained.best_valid_ndcg10,
    )


def cold_items(split: Split) -> np.ndarray:
    """The cold-item slice's items: a fixed random COLD_ITEM_FRACTION of all items (item
    indices), drawn with a seed of their own, the same for every model and run."""
    rng = np.random.default_rng(COLD_ITEM_SEED)
    n = round(COLD_ITEM_FRACTION * split.n_items)
    return np.sort(rng.choice(np.arange(1, split.n_items + 1), n, replace=False))


# --- the runs, as tasks a process pool can take ------------------------------------------


@dataclass(frozen=True)
class DynembRun:
    """One seed of the main table (the first also reads the cold-start slices and may save
    its checkpoint)."""

    train: TrainOptions
    first: bool = False
    checkpoint: Path | None = None

    def identity(self) -> str:
        """What its result depends on (where the checkpoint goes does not: it is kept
        with the result and put back wherever it is asked for)."""
        return repr((quiet(self.train), self.first, bool(self.writes())))

    def writes(self) -> tuple[Path, ...]:
        return (self.checkpoint,) if self.first and self.checkpoint is not None else ()

    def __call__(self, dataset: Dataset) -> RunResult:
        trained = fit(dataset, leave_one_out(dataset), self.train)
        row = run_result(trained)
        if self.first:
            row.cold_start = cold_start(trained)
            if self.checkpoint is not None:
                trained.checkpoint(dataset).save(self.checkpoint)
        logger.info("dynemb seed %d: %s", self.train.seed, row.test.excluded)
        return row


@dataclass(frozen=True)
class SasrecRun:
    seed: int

    def __call__(self, dataset: Dataset) -> RunResult:
        from dynemb.evaluation.baselines import TUNED_SASREC, run_sasrec_seeds

        return run_sasrec_seeds(leave_one_out(dataset), TUNED_SASREC, [self.seed])[0]


@dataclass(frozen=True)
class ColdItemRun:
    """dynemb trained without any event of the cold items, read on the users whose test
    target is one of them (every item ranked; the cold ones by content and title only)."""

    train: TrainOptions

    def identity(self) -> str:
        return repr(("cold items", quiet(self.train)))

    def __call__(self, dataset: Dataset) -> tuple[RunResult, SeenMetrics]:
        split = leave_one_out(dataset)
        cold = split.withhold(cold_items(split))
        trained = fit(dataset, cold, self.train)
        users = cold_item_users(cold)
        return run_result(trained, evaluate(trained, users=users)), evaluate(trained)


def cold_item_users(split: Split) -> np.ndarray:
    """Evaluated users whose test target is a withheld item."""
    users = split.eval_users
    return users[np.isin(split.test[users], split.withheld)]


def quality_benchmark(dataset: Dataset, options: QualityOptions) -> QualityResult:
    """Train dynemb per seed (plus ablations, the cold-item slice and the baselines),
    evaluate on test, write results."""
    started = time.perf_counter()
    run = RunRecord.now(options.command)
    split = leave_one_out(dataset)
    seeds = options.seeds
    tasks: list = [
        DynembRun(replace(options.train, seed=seed), seed == seeds[0], options.checkpoint)
        for seed in seeds
    ]
    cold_seeds = options.cold_item_seeds or seeds[:1]
    if options.cold_items:
        tasks += [ColdItemRun(replace(options.train, seed=seed)) for seed in cold_seeds]
    ablations = ablation_runs(options) if options.ablations else {}
    tasks += [DynembRun(opts) for opts in ablations.values()]
    if options.baselines:
        tasks += [SasrecRun(seed) for seed in seeds]
    store = store_for(dataset, options.resume, options.runs_dir)
    results = iter(run_tasks(dataset, tasks, options.workers, store))
    run.resumed_runs = store.reused
    models: dict[str, ModelResult] = {"dynemb": ModelResult([next(results) for _ in seeds])}
    cold = [next(results) for _ in cold_seeds] if options.cold_items else []
    for name, opts in ablations.items():
        models[f"ablation: {name}"] = ModelResult(
            [next(results)], budget_minutes=opts.max_minutes, max_epochs=opts.max_epochs
        )
    if options.baselines:
        from dynemb.evaluation.baselines import TUNED_SASREC, most_popular_metrics

        sasrec = [next(results) for _ in seeds]
        models["MostPop"] = ModelResult([RunResult(test=most_popular_metrics(split))])
        models["SASRec-CE"] = ModelResult(sasrec, config=asdict(TUNED_SASREC))
    run.total_seconds = round(time.perf_counter() - started, 1)
    result = QualityResult(
        data=dataset.name,
        synthetic=dataset.synthetic,
        protocol=__doc__.split("\n\n", 1)[1].strip(),
        query_time=QUERY_TIME_NOTE,
        users=split.n_users,
        evaluated_users=len(split.eval_users),
        items=split.n_items,
        seeds=list(seeds),
        train_options=as_record(options.train),
        models=models,
        run=run,
        cold_items=cold_item_result(split, cold) if cold else None,
    )
    if options.baselines:
        result.ratio_interval = ratio_interval(
            *(per_user(models[name]) for name in ("dynemb", "SASRec-CE"))
        )
    save_report(result, options.out_dir, options.stem, render_markdown(result))
    store.clear()  # written: nothing left to resume
    return result


def per_user(model: ModelResult) -> np.ndarray:
    """(runs, users) NDCG@10 per user, seen excluded."""
    return np.array([run.test.ndcg10_per_user for run in model.runs])


def cold_item_result(split: Split, runs: list[tuple[RunResult, SeenMetrics]]) -> ColdItemResult:
    from dynemb.evaluation.baselines import most_popular

    cold = split.withhold(cold_items(split))
    users = cold_item_users(cold)
    rows = np.searchsorted(cold.eval_users, users)
    scores = most_popular(cold, "test")[rows]
    histories = [cold.history(int(u), "test") for u in users]
    return ColdItemResult(
        fraction=COLD_ITEM_FRACTION,
        items=len(cold.withheld),
        users=len(users),
        dynemb=[slice_run for slice_run, _ in runs],
        dynemb_all_users=[everyone for _, everyone in runs],
        most_pop=SeenMetrics.from_scores(scores, cold.test[users], histories),
    )


def ablation_runs(options: QualityOptions) -> dict[str, TrainOptions]:
    """Each ablation variant, trained once (the first seed) under the same budget."""
    return {
        name: replace(
            options.train,
            seed=options.seeds[0],
            variant=variant,
            max_minutes=options.ablation_minutes or options.train.max_minutes,
            max_epochs=options.ablation_epochs or options.train.max_epochs,
        )
        for name, variant in {"full (same budget)": Variant(), **ABLATIONS}.items()
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


def _ratio_lines(result: QualityResult) -> list[str]:
    ndcg = result.ratio("ndcg@10")
    line = (
        f"dynemb / SASRec-CE (seen excluded): NDCG@10 **{ndcg:.3f}×**, "
        f"Recall@10 {result.ratio('recall@10'):.3f}×"
    )
    if result.ratio_interval is None:
        return [line + "."]
    low, high = result.ratio_interval
    met = ndcg >= RATIO_TARGET and low >= RATIO_LOW_TARGET
    return [
        line + f"; 95% interval of the NDCG@10 ratio {low:.3f}–{high:.3f} (bootstrap over "
        "seeds and users, `metrics.ratio_interval`).",
        f"Target: ratio ≥ {RATIO_TARGET:.2f}× with the interval's lower end ≥ "
        f"{RATIO_LOW_TARGET:.2f}×: **{'met' if met else 'not met'}**.",
    ]


def _cold_item_lines(cold: ColdItemResult) -> list[str]:
    seeds = ", ".join(str(r.seed) for r in cold.dynemb)
    rows = {
        f"dynemb ({cold.users} users)": ModelResult(cold.dynemb),
        f"MostPop ({cold.users} users)": ModelResult([RunResult(cold.most_pop)]),
        "dynemb (all evaluated users)": ModelResult(
            [RunResult(metrics) for metrics in cold.dynemb_all_users]
        ),
    }
    ours = ModelResult(cold.dynemb).summary()["ndcg@10"][0]
    theirs = cold.most_pop.excluded["ndcg@10"]
    versus = f"{ours / theirs:.2f}× MostPop's {theirs:.4f}" if theirs > 0 else "MostPop scores 0"
    return [
        f"## Cold items ({cold.fraction:.0%} of items withheld from training, dynemb "
        f"seed(s) {seeds})",
        "",
        f"{cold.items} items, drawn once with their own seed, have every training event "
        "removed and no id row; the model trained without them ranks every item for the "
        f"{cold.users} users whose test target is one of them (the cold items by content "
        "and title alone). MostPop counts the training events left (none of the withheld "
        "items') and the validation events, as it does for the main table. SASRec-CE "
        f"{cold.sasrec}.",
        "",
        *_table(rows),
        "",
        f"dynemb NDCG@10 on the slice (seen excluded): {ours:.4f}; {versus}.",
    ]


def _content_only_line(part: SliceResult, most_pop: ModelResult) -> str:
    ours = part.test.excluded["ndcg@10"]
    theirs = most_pop.summary()["ndcg@10"][0]
    met = ours >= CONTENT_TARGET * theirs
    return (
        f"Content-only item table (every id row withheld), seen excluded: NDCG@10 {ours:.4f}"
        f" = {ours / theirs:.2f}× MostPop's {theirs:.4f} (target ≥ {CONTENT_TARGET:.0f}×: "
        f"**{'met' if met else 'not met'}**)."
    )


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
        md += ["", *_ratio_lines(result)]
    if result.cold_items is not None:
        md += ["", *_cold_item_lines(result.cold_items)]
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
        content_only = dyn[0].cold_start.get(CONTENT_ONLY)
        if content_only is not None and content_only.test and "MostPop" in models:
            md += ["", _content_only_line(content_only, models["MostPop"])]
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
