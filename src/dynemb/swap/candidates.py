"""Candidate versions of one stage, made from the serving one: for trials, drills and the
swap tests. `dynemb train --only STAGE` makes trained candidates; these are changed copies
(a small perturbation, fresh weights) and deliberately broken ones, so the swap guards
can be shown to refuse them. What each kind does to a stage's artifact is the stage's
own business (`Stage.change`)."""

from __future__ import annotations

import shutil
from pathlib import Path

from dynemb import stages
from dynemb.errors import UsageError
from dynemb.manifest import ADAPTER, Manifest
from dynemb.pipeline import latest_version
from dynemb.stages.base import CANDIDATE_KINDS, CandidateChange


def make_candidate(
    repository: Path,
    stage: str,
    out: Path,
    kind: str = "perturb",
    scale: float = 0.01,
    seed: int = 0,
) -> Path:
    """Copy the serving version of `stage` to `out` and change it as `kind` says:
    perturb (relative Gaussian noise), reinit (fresh seeded weights), nan (NaN outputs),
    broken (an artifact whose load raises), signature (one more output channel)."""
    found = stages.get(stage)
    if kind not in CANDIDATE_KINDS:
        raise UsageError(f"kind must be one of {', '.join(CANDIDATE_KINDS)}, got {kind!r}")
    if kind not in found.candidate_kinds:
        raise UsageError(
            f"{stage} cannot make a {kind!r} candidate (it can: {', '.join(found.candidate_kinds)})"
        )
    source = latest_version(repository / stage)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(ADAPTER, "__pycache__"))
    manifest = Manifest.load(out)
    change = CandidateChange(kind, scale, seed)  # type: ignore[arg-type]
    if kind == "signature":
        manifest.signature = manifest.signature.widened()
    else:
        found.change(out, manifest, change)
    manifest.provenance.candidate = kind
    manifest.provenance.scale = scale
    manifest.provenance.candidate_seed = seed
    manifest.save(out)
    return out
