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
from dynemb.paths import made_beside
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
    Manifest.load(source)  # a version without one (a skeleton) is named as itself
    check_out(out, repository)
    with made_beside(out) as staging:  # over an earlier candidate (check_out), if any
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(ADAPTER, "__pycache__"))
        manifest = Manifest.load(staging)
        change = CandidateChange(kind, scale, seed)  # type: ignore[arg-type]
        if kind == "signature":
            manifest.signature = manifest.signature.widened()
        else:
            found.change(staging, manifest, change)
        manifest.provenance.candidate = kind
        manifest.provenance.scale = scale
        manifest.provenance.candidate_seed = seed
        manifest.save(staging)
    return out


def check_out(out: Path, repository: Path | None) -> None:
    """A candidate goes outside the model repository, and over nothing but a folder that
    holds an earlier candidate (or nothing): `out` is replaced whole."""
    target = out.resolve()
    repo = repository.resolve() if repository is not None else None
    if repo is not None and (target == repo or repo in target.parents or target in repo.parents):
        raise UsageError(f"{out}: a candidate goes outside the model repository {repository}")
    if out.exists() and not (out.is_dir() and _is_candidate(out)):
        raise UsageError(
            f"{out} exists and is not an earlier candidate: pick a new folder (it is replaced "
            "whole)"
        )


def _is_candidate(folder: Path) -> bool:
    """Made by `dynemb candidate` or by `dynemb train --only`."""
    try:
        provenance = Manifest.load(folder).provenance
    except Exception:  # unreadable: not one of ours
        return False
    return provenance.candidate is not None or provenance.only is not None
