"""Does E_t follow a change of interest? Measured on SYNTHETIC data, where the truth is known.

Users of `dynemb.data.synthetic` jump between interest categories at recorded change
points. The model is trained on 80% of the users; on the held-out 20%, for each change
point c and each of the first few events after it (j = c+1 .. c+3, still in the new
interest), we rank all items for the target event j with:

- fresh E_t: history = events before j, t = time of event j (what is served);
- stale E_t: the same request with t = time of event c minus `stale_hours` (so every event
  of the new interest is in t's future and ignored);
- static: the mean of the item-tower vectors of the history's items (a profile that does
  not know which events are recent), L2-normalised.

Reported: Recall@10 of the target (seen items kept: synthetic users revisit items), and
the share of the top 10 that belongs to the new interest category; mean ± std over seeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from dynemb.data.synthetic import SyntheticConfig, SyntheticData, generate
from dynemb.evaluation.metrics import evaluate_scores, format_mean_std, summarize
from dynemb.evaluation.results import (
    DynamicsMethod,
    DynamicsResult,
    DynamicsRun,
    RunRecord,
    save_report,
)
from dynemb.evaluation.runs import quiet, run_tasks, store_for
from dynemb.evaluation.split import Split, leave_one_out
from dynemb.paths import RESULTS_DIR
from dynemb.training.train import (
    Trained,
    TrainOptions,
    fit,
    item_table,
    user_vectors,
)

logger = logging.getLogger(__name__)

METHODS = ("fresh E_t", "stale E_t", "static mean")


@dataclass
class DynamicsOptions:
    data: SyntheticConfig = field(default_factory=SyntheticConfig)
    seeds: tuple[int, ...] = (0, 1, 2)
    # Short synthetic histories: every training event is a target ("all" windows).
    train: TrainOptions = field(
        default_factory=lambda: TrainOptions(max_minutes=3.0, windows="all")
    )
    holdout: float = 0.2  # share of users never trained on
    after: tuple[int, ...] = (1, 2, 3)  # events after the change point to score
    stale_hours: float = 1.0
    out_dir: Path = RESULTS_DIR
    stem: str = "dynamics-synthetic"
    command: str = ""
    # Take the seeds an interrupted invocation finished (dynemb.evaluation.runs) from
    # `runs_dir` (None: the cache's).
    resume: bool = True
    runs_dir: Path | None = None


def probes(data: SyntheticData, users: Sequence[int], after: Sequence[int]) -> list[tuple]:
    """(user row, change index c, target index j) for targets still in the new interest."""
    split_users = list(data.dataset.by_user())
    out = []
    for u in users:
        changes = data.change_points[split_users[u]]
        n = len(data.interest[split_users[u]])
        for i, c in enumerate(changes):
            end = changes[i + 1] if i + 1 < len(changes) else n
            out += [(u, c, c + k) for k in after if c + k < end]
    return out


def _top10_share(scores: np.ndarray, categories: np.ndarray, wanted: np.ndarray) -> float:
    top = np.argsort(-scores, axis=1)[:, :10]
    return float((categories[top] == wanted[:, None]).mean())


def measure(
    trained: Trained,
    data: SyntheticData,
    users: Sequence[int],
    after: Sequence[int],
    stale_hours: float,
) -> tuple[int, dict[str, DynamicsMethod]]:
    """(number of probes, each method's scores) on the held-out `users`."""
    split, builder, model = trained.split, trained.builder, trained.model
    rows = probes(data, users, after)
    events = split.events
    items, bias = item_table(model)
    fresh = user_vectors(model, builder, [(u, j) for u, _, j in rows])
    stale_t = [events[u][c].time - 3600.0 * stale_hours for u, c, _ in rows]
    stale = user_vectors(
        model, builder, [(u, j, t) for (u, _, j), t in zip(rows, stale_t, strict=True)]
    )
    static = []
    for u, _, j in rows:
        hist = [split.item_index[e.item_id] for e in events[u][:j][-builder.dims.max_events :]]
        v = items[np.array(hist) - 1].mean(0)
        static.append(v / max(np.linalg.norm(v), 1e-12))
    targets = np.array([split.item_index[events[u][j].item_id] for u, _, j in rows])
    category = np.zeros(split.n_items + 1, np.int64) - 1
    for item_id, idx in split.item_index.items():
        category[idx] = data.item_category[item_id]
    new_interest = np.array([data.interest[split.users[u]][j] for u, _, j in rows])
    out = {}
    for name, users_vec in zip(METHODS, (fresh, stale, np.stack(static)), strict=True):
        # Every method is scored as retrieve scores E_t: E · v + b over the same table.
        scores = users_vec @ items.T + bias[None, :]
        scores = np.concatenate([np.full((len(rows), 1), -np.inf), scores], 1)
        metrics = evaluate_scores(scores, targets, ks=(10,))
        out[name] = DynamicsMethod(
            recall10=metrics["recall@10"],
            ndcg10=metrics["ndcg@10"],
            top10_new_interest_share=_top10_share(scores[:, 1:], category[1:], new_interest),
        )
    return len(rows), out


def trajectory_png(trained: Trained, data: SyntheticData, user: int, path: Path) -> None:
    """E_t after every event of one user, 2-D PCA, coloured by the interest at that time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = trained.split.events[user]
    interest = data.interest[trained.split.users[user]]
    cuts = list(range(1, len(events)))
    # E_t just after event i-1 was seen: t = time of event i, history = events before i.
    vectors = user_vectors(trained.model, trained.builder, [(user, c) for c in cuts])
    centred = vectors - vectors.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    colour = [interest[c - 1] for c in cuts]  # interest of the newest event in the history
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.plot(xy[:, 0], xy[:, 1], color="0.8", lw=0.8, zorder=1)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=colour, cmap="tab10", vmin=0, vmax=9, s=18, zorder=2)
    for c in data.change_points[trained.split.users[user]]:
        if 1 <= c < len(cuts):
            ax.annotate(f"change @{c}", xy[c], fontsize=7)
    ax.set_title(f"E_t of {trained.split.users[user]} over time (SYNTHETIC), PCA")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.colorbar(points, ax=ax, label="interest category of the newest event")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def held_out(split: Split, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(held-out users, training users): a fixed draw, the same for every seed."""
    rng = np.random.default_rng(12345)
    order = rng.permutation(split.n_users)
    n_hold = max(1, round(share * split.n_users))
    return np.sort(order[:n_hold]), np.sort(order[n_hold:])


@dataclass(frozen=True)
class DynamicsSeed:
    """One seed, as a task (dynemb.evaluation.runs): train on the training users, score
    the held-out ones; the first seed also draws the trajectory plot (`png`)."""

    train: TrainOptions
    holdout: float
    after: tuple[int, ...]
    stale_hours: float
    png: Path | None = None

    def identity(self) -> str:
        plot = self.png is not None
        return repr(
            ("dynamics", quiet(self.train), self.holdout, self.after, self.stale_hours, plot)
        )

    def writes(self) -> tuple[Path, ...]:
        return (self.png,) if self.png is not None else ()

    def __call__(self, data: SyntheticData) -> DynamicsRun:
        split = leave_one_out(data.dataset)
        held, train_users = held_out(split, self.holdout)
        trained = fit(data.dataset, split, self.train, users=train_users)
        n_probes, methods = measure(trained, data, held, self.after, self.stale_hours)
        run = DynamicsRun(self.train.seed, round(trained.seconds, 1), n_probes, methods)
        logger.info("dynamics seed %d: %s", self.train.seed, run)
        if self.png is not None:
            self.png.parent.mkdir(parents=True, exist_ok=True)
            trajectory_png(trained, data, int(held[0]), self.png)
        return run


def dynamics_benchmark(options: DynamicsOptions) -> DynamicsResult:
    started = time.perf_counter()
    record = RunRecord.now(options.command)
    data = generate(options.data)
    held, _ = held_out(leave_one_out(data.dataset), options.holdout)
    png = options.out_dir / f"{options.stem}.png"
    tasks = [
        DynamicsSeed(
            replace(options.train, seed=seed),
            options.holdout,
            options.after,
            options.stale_hours,
            png if seed == options.seeds[0] else None,
        )
        for seed in options.seeds
    ]
    store = store_for(data, options.resume, options.runs_dir)
    runs = run_tasks(data, tasks, store=store)
    record.resumed_runs = store.reused
    record.total_seconds = round(time.perf_counter() - started, 1)
    result = DynamicsResult(
        data="SYNTHETIC (dynemb.data.synthetic)",
        config=repr(options.data),
        protocol=__doc__.split("\n\n", 1)[1].strip(),
        held_out_users=len(held),
        after=list(options.after),
        stale_hours=options.stale_hours,
        seeds=list(options.seeds),
        runs=runs,
        run=record,
    )
    save_report(result, options.out_dir, options.stem, render_markdown(result, options.stem))
    store.clear()  # written: nothing left to resume
    return result


def summary(result: DynamicsResult) -> dict[str, dict[str, tuple[float, float]]]:
    """Mean and std over seeds of each method's scores."""
    return {
        method: {
            key: summarize([getattr(r.methods[method], key) for r in result.runs])
            for key in ("recall10", "ndcg10", "top10_new_interest_share")
        }
        for method in METHODS
    }


def margin_over(result: DynamicsResult, other: str) -> tuple[float, float]:
    """Mean and std over seeds of fresh E_t's Recall@10 minus `other`'s."""
    return summarize(
        [r.methods["fresh E_t"].recall10 - r.methods[other].recall10 for r in result.runs]
    )


def criterion_met(result: DynamicsResult, other: str = "static mean") -> bool:
    """Fresh E_t beats `other` on Recall@10 by more than 3 x the largest std involved."""
    s = summary(result)
    margin, margin_std = margin_over(result, other)
    largest = max(s["fresh E_t"]["recall10"][1], s[other]["recall10"][1], margin_std)
    return margin > 3 * largest


def render_markdown(result: DynamicsResult, stem: str) -> list[str]:
    s = summary(result)
    md = [
        "# Dynamics of E_t after an interest change — SYNTHETIC data",
        "",
        "All numbers here come from the seeded synthetic generator, not real behaviour.",
        "",
        result.protocol,
        "",
        f"{result.held_out_users} held-out users, {result.runs[0].probes} probes "
        f"(events {result.after} after a change point); stale t = change time − "
        f"{result.stale_hours} h; seeds {result.seeds} (mean ± std).",
        "",
        "| method | Recall@10 | NDCG@10 | top-10 share in new interest |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        m = s[method]
        md.append(
            f"| {method} | {format_mean_std(*m['recall10'])} | {format_mean_std(*m['ndcg10'])} "
            f"| {format_mean_std(*m['top10_new_interest_share'])} |"
        )
    fresh = s["fresh E_t"]["recall10"]
    for other in METHODS[1:]:
        o = s[other]["recall10"]
        margin, margin_std = margin_over(result, other)
        largest_std = max(fresh[1], o[1], margin_std)
        verdict = "more" if criterion_met(result, other) else "NOT more"
        md.append("")
        md.append(
            f"Recall@10 margin fresh − {other}: {margin:+.4f} (std over seeds: of the margin "
            f"{margin_std:.4f}, fresh {fresh[1]:.4f}, {other} {o[1]:.4f}); {verdict} than "
            f"3 × the largest of these stds ({3 * largest_std:.4f})."
        )
    md += ["", f"![E_t trajectory]({stem}.png)", "", "## Context", ""]
    return md
