"""Quality of trained embeddings on the leave-one-out protocol, next to the baselines.

Protocol (the same as dynemb.evaluation.baselines): each user's events in time order; the
last is the test target, the second-last the validation target, the rest training
(`leave_one_out`). Every item is ranked (full ranking, pessimistic ties), metrics are
averaged over evaluated users, reported with already-seen items kept and excluded, and
summarised as mean ± sample std over the seeds fixed before running. Models select their
epoch on validation NDCG@10 only; test is read once per trained model.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dynemb.data.types import Dataset
from dynemb.evaluation.metrics import evaluate_scores, format_mean_std, summarize_runs
from dynemb.evaluation.split import Split, Which, leave_one_out
from dynemb.manifest import git_commit
from dynemb.paths import RESULTS_DIR
from dynemb.training.model import Variant
from dynemb.training.train import Trained, TrainOptions, fit, scores_for

logger = logging.getLogger(__name__)

COLUMNS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20", "mrr@10")
SEEN = {False: "kept", True: "excluded"}
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
) -> dict[str, dict[str, float]]:
    """Full-ranking metrics of `which`, with seen items kept and excluded.

    Keywords go to `scores_for` (`with_ids=False` scores against content-only item vectors,
    `limit=k` sends only the newest k events).
    """
    split = trained.split
    users = split.eval_users if users is None else np.asarray(users)
    scores = scores_for(trained.model, trained.builder, which, users, **kw)
    targets = (split.valid if which == "valid" else split.test)[users]
    histories = [split.history(int(u), which) for u in users]
    return {
        SEEN[flag]: evaluate_scores(scores, targets, histories if flag else None)
        for flag in (False, True)
    }


def cold_start(trained: Trained) -> dict[str, dict]:
    """Short histories (newest 5 events only), and rare / id-less items (content only)."""
    split = trained.split
    counts = np.zeros(split.n_items + 1, np.int64)
    for seq in split.train:
        np.add.at(counts, seq, 1)
    users = split.eval_users
    rare = users[counts[split.test[users]] <= RARE_ITEM]
    out = {
        f"history <= {COLD_HISTORY} events (all test users, newest {COLD_HISTORY} sent)": {
            "users": len(users),
            **evaluate(trained, users=users, limit=COLD_HISTORY),
        },
        f"users with <= {COLD_HISTORY} training events": {
            "users": int(sum(len(split.train[u]) <= COLD_HISTORY for u in users))
        },
        f"target item with <= {RARE_ITEM} training interactions": {
            "users": len(rare),
            **(evaluate(trained, users=rare) if len(rare) else {}),
        },
    }
    if trained.options.variant.item_ids:
        out["all item id rows withheld (content-only item table)"] = {
            "users": len(users),
            **evaluate(trained, with_ids=False),
        }
        if len(rare):
            out["rare target items, id rows withheld"] = {
                "users": len(rare),
                **evaluate(trained, users=rare, with_ids=False),
            }
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


def machine() -> dict[str, object]:
    import os

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def _run_row(trained: Trained) -> dict:
    return {
        "seed": trained.options.seed,
        "best_epoch": trained.best_epoch,
        "epochs": len(trained.epochs),
        "examples": sum(e.examples for e in trained.epochs),
        "train_seconds": round(trained.seconds, 1),
        "seconds_per_epoch": [round(e.seconds, 1) for e in trained.epochs],
        "valid_ndcg10": trained.best_valid_ndcg10,
    }


def quality_benchmark(dataset: Dataset, options: QualityOptions) -> dict:
    """Train dynemb per seed (plus ablations and baselines), evaluate on test, write results."""
    started = time.perf_counter()
    split = leave_one_out(dataset)
    rows: dict[str, dict] = {}
    builder = None

    dyn = []
    for seed in options.seeds:
        trained = fit(dataset, split, replace(options.train, seed=seed), builder=builder)
        builder = trained.builder
        run = _run_row(trained)
        run["test"] = evaluate(trained)
        if seed == options.seeds[0]:
            run["cold_start"] = cold_start(trained)
            if options.checkpoint is not None:
                trained.checkpoint(dataset).save(options.checkpoint)
        dyn.append(run)
        logger.info("dynemb seed %d: %s", seed, run["test"]["excluded"])
    rows["dynemb"] = {"runs": dyn}

    if options.baselines:
        rows.update(_baselines(split, options.seeds))

    if options.ablations:
        budget = options.ablation_minutes or options.train.max_minutes
        seed = options.seeds[0]
        for name, variant in {"full (same budget)": Variant(), **ABLATIONS}.items():
            opts = replace(
                options.train,
                seed=seed,
                variant=variant,
                max_minutes=budget,
                max_epochs=options.ablation_epochs or options.train.max_epochs,
            )
            trained = fit(dataset, split, opts, builder=builder)
            run = _run_row(trained)
            run["test"] = evaluate(trained)
            rows[f"ablation: {name}"] = {
                "runs": [run],
                "budget_minutes": budget,
                "max_epochs": opts.max_epochs,
            }
            logger.info("ablation %s: %s", name, run["test"]["excluded"])

    result = {
        "data": dataset.name,
        "synthetic": dataset.synthetic,
        "protocol": __doc__.split("\n\n", 1)[1].strip(),
        "query_time": QUERY_TIME_NOTE,
        "users": split.n_users,
        "evaluated_users": len(split.eval_users),
        "items": split.n_items,
        "seeds": list(options.seeds),
        "train_options": json.loads(json.dumps(asdict(options.train), default=str)),
        "command": options.command,
        "git_commit": git_commit(dirty_flag=True),
        "machine": machine(),
        "total_seconds": round(time.perf_counter() - started, 1),
        "models": rows,
    }
    write_results(result, options.out_dir, options.stem)
    return result


def _baselines(split: Split, seeds: Sequence[int]) -> dict[str, dict]:
    from dynemb.evaluation.baselines import TUNED_SASREC, most_popular, run_sasrec_seeds
    from dynemb.evaluation.baselines import evaluate as evaluate_baseline

    pop = most_popular(split, "test")
    out = {
        "MostPop": {
            "runs": [
                {"test": {SEEN[f]: evaluate_baseline(pop, split, "test", f) for f in (False, True)}}
            ]
        }
    }
    config = TUNED_SASREC
    t0 = time.perf_counter()
    results = run_sasrec_seeds(split, config, seeds)
    out["SASRec-CE"] = {
        "config": asdict(config),
        "runs": [
            {
                "seed": r.seed,
                "best_epoch": r.best_epoch,
                "train_seconds": round(r.seconds, 1),
                "valid_ndcg10": r.valid_ndcg10,
                "test": {SEEN[f]: r.test[f] for f in (False, True)},
            }
            for r in results
        ],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return out


def _table(models: dict[str, dict]) -> list[str]:
    lines = [
        "| model | seen items | runs | " + " | ".join(COLUMNS) + " |",
        "|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for flag in ("excluded", "kept"):
        for name, entry in models.items():
            runs = [r["test"][flag] for r in entry["runs"]]
            summary = summarize_runs(runs)
            cells = [format_mean_std(*summary[c]) for c in COLUMNS]
            lines.append(f"| {name} | {flag} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines


def save_report(result: dict, out_dir: Path, stem: str, md: list[str]) -> None:
    """Write `stem`.json (the result) and `stem`.md (`md` plus the run's context), UTF-8."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, default=str) + "\n"
    (out_dir / f"{stem}.json").write_text(text, encoding="utf-8")
    context = [
        f"- command: `{result['command']}`",
        f"- git commit: {result['git_commit']}",
        f"- machine: {result['machine']}",
    ]
    if "train_options" in result:
        context.append(f"- training options: `{result['train_options']}`")
    context.append(f"- total wall-clock: {result['total_seconds']} s")
    (out_dir / f"{stem}.md").write_text("\n".join([*md, *context]) + "\n", encoding="utf-8")


def write_results(result: dict, out_dir: Path, stem: str) -> None:
    models = result["models"]
    main = {k: v for k, v in models.items() if not k.startswith("ablation")}
    ablations = {k: v for k, v in models.items() if k.startswith("ablation")}
    md = [
        f"# Next-item quality on {result['data']}"
        + (" (SYNTHETIC data)" if result["synthetic"] else ""),
        "",
        f"{result['users']} users ({result['evaluated_users']} evaluated), "
        f"{result['items']} items. Seeds {result['seeds']} fixed in advance; mean ± std.",
        "",
        "## Protocol",
        "",
        result["protocol"],
        "",
        f"Query time: {result['query_time']}.",
        "",
        "## Test results",
        "",
        *_table(main),
    ]
    if "dynemb" in main and "SASRec-CE" in main:
        d = summarize_runs([r["test"]["excluded"] for r in main["dynemb"]["runs"]])
        s = summarize_runs([r["test"]["excluded"] for r in main["SASRec-CE"]["runs"]])
        md += [
            "",
            "dynemb / SASRec-CE (seen excluded): NDCG@10 "
            f"{d['ndcg@10'][0] / s['ndcg@10'][0]:.3f}×, Recall@10 "
            f"{d['recall@10'][0] / s['recall@10'][0]:.3f}× (target: ≥ 1.10× NDCG@10).",
        ]
    if ablations:
        first = next(iter(ablations.values()))
        budget, epochs = first["budget_minutes"], first.get("max_epochs", "?")
        md += [
            "",
            f"## Ablations (seed {result['seeds'][0]}, {epochs} epochs or {budget} min each)",
            "",
            *_table(ablations),
        ]
    dyn = models.get("dynemb", {}).get("runs", [])
    if dyn and "cold_start" in dyn[0]:
        md += ["", f"## Cold start (dynemb seed {dyn[0]['seed']})", ""]
        md += ["| slice | users | seen items | " + " | ".join(COLUMNS) + " |"]
        md += ["|---|---|---|" + "---|" * len(COLUMNS)]
        for name, entry in dyn[0]["cold_start"].items():
            if "excluded" not in entry:
                md.append(f"| {name} | {entry['users']} | – |" + " – |" * len(COLUMNS))
                continue
            for flag in ("excluded", "kept"):
                cells = [f"{entry[flag][c]:.4f}" for c in COLUMNS]
                md.append(f"| {name} | {entry['users']} | {flag} | " + " | ".join(cells) + " |")
    md += ["", "## Runs", "", "| model | seed | best epoch | epochs | train s | valid NDCG@10 |"]
    md += ["|---|---|---|---|---|---|"]
    for name, entry in models.items():
        for r in entry["runs"]:
            if "seed" in r:
                md.append(
                    f"| {name} | {r['seed']} | {r['best_epoch']} | {r.get('epochs', '')} | "
                    f"{r['train_seconds']} | {r['valid_ndcg10']:.4f} |"
                )
    md += ["", "## Context", ""]
    save_report(result, out_dir, stem, md)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m dynemb.training.evaluate`: the quality benchmark (until the CLI has it)."""
    import argparse
    import sys

    from dynemb.data import load_dataset
    from dynemb.paths import cache_dir

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--data", "--dataset", dest="data", default="ml-100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-minutes", type=float, default=TrainOptions.max_minutes)
    parser.add_argument("--max-epochs", type=int, default=TrainOptions.max_epochs)
    parser.add_argument("--threads", type=int, default=TrainOptions.num_threads)
    parser.add_argument("--ablation-minutes", type=float, default=None)
    parser.add_argument("--ablation-epochs", type=int, default=None)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--stem", default="quality-ml100k")
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dataset = load_dataset(args.data, cache_dir())
    options = QualityOptions(
        data=args.data,
        seeds=tuple(args.seeds),
        train=TrainOptions(
            max_minutes=args.max_minutes,
            max_epochs=args.max_epochs,
            num_threads=args.threads,
            progress=sys.stderr.isatty(),
        ),
        ablation_minutes=args.ablation_minutes,
        ablation_epochs=args.ablation_epochs,
        ablations=not args.no_ablations,
        baselines=not args.no_baselines,
        stem=args.stem,
        checkpoint=args.checkpoint,
        command="python -m dynemb.training.evaluate " + " ".join(argv or sys.argv[1:]),
    )
    quality_benchmark(dataset, options)


if __name__ == "__main__":
    main()
