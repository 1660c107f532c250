"""`make demo`: build the repository if needed, serve it, query sample users, print, stop."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynemb import stages
from dynemb.data import load_dataset
from dynemb.dims import DIMS
from dynemb.paths import cache_dir, unfinished_build
from dynemb.pipeline import serving_manifest_paths, serving_manifests
from dynemb.queries import event_converter
from dynemb_client import Event, InterestClient

log = logging.getLogger(__name__)
DEMO_EPOCHS = 12


def demo_checkpoint(
    catalogue: str, minutes: float, echo: Callable[[str], None]
) -> tuple[Path | None, bool]:
    """The full training run's checkpoint if there is one, else a short demo run's
    (trained now if missing). Returns (path, whether it was just trained)."""
    from dynemb.checkpoint import Checkpoint, StaleCheckpointError

    directory = cache_dir() / "checkpoints"
    full, short = directory / f"{catalogue}.pt", directory / f"{catalogue}-demo.pt"
    for path in (full, short):
        if path.exists():
            try:
                Checkpoint.load(path)
                return path, False
            except StaleCheckpointError as err:
                echo(f"ignoring {path}: {err}")
    if minutes <= 0:
        return None, False
    from dynemb.training.train import TrainOptions, train

    echo(
        f"no trained checkpoint: training a SHORT DEMO model ({minutes:g} min budget; "
        "`dynemb train` runs the full 25-minute training)"
    )
    dataset = load_dataset(catalogue, cache_dir())
    # A short cosine schedule that a few minutes can finish: one window per user
    # (about 15 s an epoch on two cores) instead of the full run's every-event windows.
    options = TrainOptions(max_minutes=minutes, max_epochs=DEMO_EPOCHS, windows="last")
    checkpoint = train(dataset, options)
    checkpoint.provenance.budget = f"short demo run, {minutes:g} min"
    checkpoint.save(short)
    return short, True


def needs_build(repository: Path, checkpoint: Path | None) -> bool:
    """No built repository yet, one whose last build did not finish, or one built before
    the checkpoint it should serve."""
    if unfinished_build(repository):
        return True
    built = serving_manifest_paths(repository)
    if len(built) < len(stages.NAMES):
        return True
    oldest = min(path.stat().st_mtime for path in built)
    return checkpoint is not None and checkpoint.stat().st_mtime > oldest


@dataclass
class UserResult:
    name: str
    n_events: int
    embedding: np.ndarray
    recommendations: list


def training_status(repository: Path) -> str:
    """'trained (data, metrics)' or 'untrained (seeded initial weights)', from the manifests."""
    served = serving_manifests(repository)
    manifests = [m for name, m in served.items() if stages.get(name).learned]
    if manifests and all(m.trained for m in manifests):
        p = manifests[0].provenance
        budget = (
            p.budget or f"{p.train_seconds if p.train_seconds is not None else '?'} s of training"
        )
        valid = p.valid_ndcg10 if p.valid_ndcg10 is not None else float("nan")
        return f"trained on {p.data} (seed {p.seed}, {budget}, validation NDCG@10 {valid:.4f})"
    return "UNTRAINED (seeded initial weights; run `dynemb train` for a trained model)"


@dataclass
class SampleUser:
    events: list[Event]
    seen: frozenset[str]  # item ids of those events: left out of the recommendations


def sample_histories(
    catalogue: str, cache: Path, repository: Path, n_users: int = 3
) -> dict[str, SampleUser]:
    """A few real users' newest 60 events from the catalogue's data set, and a cold-start user."""
    users = load_dataset(catalogue, cache).by_user()
    convert = event_converter(repository)
    chosen = sorted(users, key=lambda u: (-len(users[u]), u))[:: max(1, len(users) // n_users)]
    samples = {}
    for u in chosen[:n_users]:
        newest = users[u][-60:]
        samples[f"user {u}"] = SampleUser(
            [convert(e) for e in newest], frozenset(e.item_id for e in newest)
        )
    samples["cold-start user (no history)"] = SampleUser([], frozenset())
    return samples


def query(url: str, users: dict[str, SampleUser], k: int = 10) -> list[UserResult]:
    """E_t and the top k items for each user at the time of their newest event. Items the
    user already had are left out, as in the quality protocol (the model is trained to rank
    the items a user has not had yet)."""
    with InterestClient(url) as client:
        results = []
        for name, user in users.items():
            events = user.events
            at = events[-1].time if events else None
            embedding = client.embed(events, at=at)
            recommendations = client.recommend(events, k=k, at=at, exclude=user.seen)
            results.append(UserResult(name, len(events), embedding, recommendations))
    return results


def _read(sent: int) -> str:
    """What of `sent` events the model reads: the newest L."""
    return f" (the newest {DIMS.max_events} read)" if sent > DIMS.max_events else ""


def render(results: list[UserResult], status: str, echo: Callable[[str], None]) -> None:
    echo(f"model: {status}")
    for r in results:
        e = r.embedding
        head = ", ".join(f"{v:+.3f}" for v in e[:6])
        echo(
            f"\n{r.name}: {r.n_events} events{_read(r.n_events)} -> E_t dim={e.shape[0]} "
            f"norm={np.linalg.norm(e):.4f} first=[{head}, ...]"
        )
        for rank, item in enumerate(r.recommendations, 1):
            echo(f"  {rank:>2}. {item.title}  (item {item.item_id}, score {item.score:.3f})")
