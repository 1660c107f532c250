"""The whole ensemble in-process: same runners, same order, no server. Used by the parity
tests (served == local), by swap's drift probes and by offline evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dynemb import stages
from dynemb.ensembles import ENSEMBLE_SPECS
from dynemb.errors import DynembError
from dynemb.manifest import MANIFEST, Manifest
from dynemb.paths import unfinished_build
from dynemb.serving.arrays import to_numpy
from dynemb.stages import Runner, RunnerOptions, load_runner
from dynemb_client import contract as wire


class RepositoryError(DynembError, FileNotFoundError):
    """A model repository without the model folders or version directories asked for."""


def versions_of(model_dir: Path) -> list[int]:
    """A model's version numbers, ascending (Triton serves the newest: policy latest 1)."""
    if not model_dir.is_dir():
        raise RepositoryError(f"{model_dir}: no such model folder; run `dynemb build`")
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(model_dir: Path) -> Path:
    """The newest version directory of a model of a repository whose build finished."""
    unfinished = unfinished_build(model_dir.parent)
    if unfinished:
        raise RepositoryError(unfinished)
    versions = versions_of(model_dir)
    if not versions:
        raise RepositoryError(f"{model_dir}: no version directory; run `dynemb build`")
    return model_dir / str(versions[-1])


def serving_manifest_paths(repository: Path) -> list[Path]:
    """The manifest file of each stage's serving (newest) version; stages not built (or
    whose newest version has no manifest) are left out."""
    found = []
    for name in stages.NAMES:
        model_dir = repository / name
        if model_dir.is_dir() and versions_of(model_dir):
            path = latest_version(model_dir) / MANIFEST
            if path.is_file():
                found.append(path)
    return found


def serving_manifests(repository: Path) -> dict[str, Manifest]:
    """The manifest of each stage's serving version, by stage; stages not built are absent."""
    return {
        path.parent.parent.name: Manifest.load(path.parent)
        for path in serving_manifest_paths(repository)
    }


def eager_uncached() -> dict[str, RunnerOptions]:
    """Every stage as it served before per-item caches and ONNX Runtime: torch eager (for
    torch stages), no cache. The reference the optimised path is checked against."""
    return {
        name: RunnerOptions(runtime="torch" if stages.trainable(name) else "")
        for name in stages.NAMES
    }


class Pipeline:
    def __init__(self, runners: dict[str, Runner]) -> None:
        self.runners = runners

    @classmethod
    def from_repository(
        cls, repository: Path, options: Mapping[str, RunnerOptions] | None = None
    ) -> Pipeline:
        """The serving versions, each with its stage's serving options unless `options`
        says otherwise for it (e.g. `EAGER_UNCACHED`)."""
        steps = ENSEMBLE_SPECS[wire.RECOMMEND].steps
        options = options or {}
        return cls(
            {
                name: load_runner(latest_version(repository / name), options=options.get(name))
                for name in steps
            }
        )

    def run(
        self, inputs: dict[str, np.ndarray], ensemble: str = wire.USER_INTEREST, checks: bool = True
    ) -> dict:
        """Every tensor the ensemble computes, keyed by name (like the ensemble's wiring).
        Each stage checks its inputs as served (InputError); `checks=False` lets a broken
        candidate's NaN flow through, for the drift probes to measure."""
        tensors = dict(inputs)
        for name in ENSEMBLE_SPECS[ensemble].steps:
            runner = self.runners[name]
            step_inputs = {t.name: tensors[t.name] for t in runner.spec.inputs}
            if not runner.device_inputs:  # a GPU stage's outputs, read by a host stage
                step_inputs = {k: to_numpy(v) for k, v in step_inputs.items()}
            if checks:
                runner.check(step_inputs)
            outputs = runner(step_inputs)
            tensors.update(runner.trim(step_inputs, outputs))
        return tensors

    def embed(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return to_numpy(self.run(inputs)[wire.USER_EMBEDDING])
