"""The manifest that makes a stage's version directory self-describing, as typed records:
which stage, its tensor signature, the dims and hyperparameters it was built with, where
its weights come from (provenance), and the sha256 of every artifact file."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynemb import __version__
from dynemb.dims import Dims
from dynemb.errors import DynembError
from dynemb.specs import Signature

if TYPE_CHECKING:
    from dynemb.swap.drift import DriftThresholds

MANIFEST = "manifest.json"
ADAPTER = "model.py"  # generated, not an artifact: never hashed


class ManifestError(DynembError, ValueError):
    """A manifest that cannot be read or does not describe its directory."""


@dataclass(frozen=True)
class DriftReport:
    """How far a candidate's probe answers are from the serving version's."""

    stage_cosine: float  # mean cosine of the stage's float outputs over real rows
    embedding_cosine_mean: float
    embedding_cosine_min: float
    top10_overlap: float
    finite: bool  # every candidate output finite

    def problems(self, thresholds: DriftThresholds) -> list[str]:
        found = []
        if not self.finite:
            found.append("the candidate's probe outputs contain NaN or inf")
        if self.embedding_cosine_mean < thresholds.min_embedding_cosine:
            found.append(
                f"E_t cosine {self.embedding_cosine_mean:.4f} < {thresholds.min_embedding_cosine}"
            )
        if self.top10_overlap < thresholds.min_top10_overlap:
            found.append(
                f"top-10 overlap {self.top10_overlap:.3f} < {thresholds.min_top10_overlap}"
            )
        return found

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Provenance:
    """Where a version's weights come from. Every field is optional: a seeded build knows
    its data and seed, a trained one its training run, a swapped one its parent."""

    data: str | None = None  # the training (or seeding) data set
    synthetic: bool = False
    seed: int | None = None
    catalogue: str | None = None  # the data set whose items fill the item table
    # Training run (dynemb train): options as recorded, best epoch and its validation score.
    options: dict[str, Any] | None = None
    best_epoch: int | None = None
    valid_ndcg10: float | None = None
    train_seconds: float | None = None
    budget: str | None = None  # e.g. "short demo run, 3 min"
    item_labels: bool = False  # events carry an "item:<id>" label (dynemb.training.examples)
    query_time: str | None = None
    # `dynemb train --only STAGE`
    only: str | None = None
    fine_tuned_from: str | None = None
    parent_valid_ndcg10: float | None = None
    drift_vs_serving: DriftReport | None = None
    # `dynemb candidate`
    candidate: str | None = None
    scale: float | None = None
    candidate_seed: int | None = None
    # `dynemb swap` / `dynemb rollback`
    parent_version: int | None = None
    drift: DriftReport | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Provenance:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ManifestError(f"provenance has unknown fields {unknown}")
        values = dict(raw)
        for name in ("drift", "drift_vs_serving"):
            if values.get(name) is not None:
                values[name] = DriftReport(**values[name])
        return cls(**values)


@dataclass
class Manifest:
    stage: str
    signature: Signature  # the stage spec's: checked on load and on swap
    dims: Dims
    hparams: Any  # the stage's typed hyperparameters (`Stage.params_type`)
    trained: bool = False
    provenance: Provenance = field(default_factory=Provenance)
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    created: str = ""
    dynemb_version: str = __version__
    git_commit: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "signature": self.signature.to_json(),
            "dims": self.dims.to_json(),
            "hparams": asdict(self.hparams),
            "trained": self.trained,
            "provenance": self.provenance.to_json(),
            "files": self.files,
            "created": self.created,
            "dynemb_version": self.dynemb_version,
            "git_commit": self.git_commit,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Manifest:
        from dynemb import stages

        stage = stages.get(raw["stage"])
        return cls(
            stage=raw["stage"],
            signature=Signature.from_json(raw["signature"]),
            dims=Dims.from_json(raw["dims"]),
            hparams=stage.params_type(**raw["hparams"]),
            trained=bool(raw["trained"]),
            provenance=Provenance.from_json(raw["provenance"]),
            files=dict(raw["files"]),
            created=raw["created"],
            dynemb_version=raw["dynemb_version"],
            git_commit=raw["git_commit"],
        )

    def save(self, directory: Path) -> Path:
        """Hash every artifact in `directory` and write the manifest beside them."""
        self.files = {
            p.name: sha256(p)
            for p in sorted(directory.iterdir())
            if p.is_file() and p.name not in (MANIFEST, ADAPTER) and not p.name.endswith(".partial")
        }
        self.created = self.created or dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"
        )
        self.git_commit = self.git_commit or git_commit()
        path = directory / MANIFEST
        text = json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"
        partial = path.with_name(MANIFEST + ".partial")  # never a half-written manifest
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        path = directory / MANIFEST
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return cls.from_json(raw)
        except FileNotFoundError:
            raise ManifestError(
                f"{directory}: no {MANIFEST}; not a stage version directory"
            ) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{path}: not a dynemb manifest ({exc})") from exc

    def verify(self, directory: Path) -> None:
        """Refuse a version directory whose artifacts are not the ones the manifest names."""
        for name, digest in self.files.items():
            path = directory / name
            if not path.exists():
                raise ManifestError(f"{path}: listed in the manifest but missing")
            if sha256(path) != digest:
                raise ManifestError(f"{path}: sha256 differs from the manifest")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(dirty_flag: bool = False) -> str:
    """The commit of the code that is running, "unknown" outside git; with `dirty_flag`,
    says whether the working tree differs from it (results name the code behind them)."""
    where = Path(__file__).parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=where,
        )
        dirty = (
            dirty_flag
            and subprocess.run(
                ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=where
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + (" (working tree has uncommitted changes)" if dirty else "")
