"""The whole ensemble in-process: same runners, same order, no server. Used by the parity
tests (served == local), by `dynemb build` (item table) and by offline evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dynemb.serving.runners import Runner, load_runner
from dynemb.specs import ENSEMBLES
from dynemb_client import contract as wire


def versions_of(model_dir: Path) -> list[int]:
    """A model's version numbers, ascending (Triton serves the newest: policy latest 1)."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(model_dir: Path) -> Path:
    versions = versions_of(model_dir)
    if not versions:
        raise FileNotFoundError(f"{model_dir}: no version directory; run `dynemb build`")
    return model_dir / str(versions[-1])


class Pipeline:
    def __init__(self, runners: dict[str, Runner]) -> None:
        self.runners = runners

    @classmethod
    def from_repository(cls, repository: Path) -> Pipeline:
        steps = ENSEMBLES[wire.RECOMMEND].steps
        return cls({name: load_runner(latest_version(repository / name)) for name in steps})

    def run(self, inputs: dict[str, np.ndarray], ensemble: str = wire.USER_INTEREST) -> dict:
        """Every tensor the ensemble computes, keyed by name (like the ensemble's wiring)."""
        tensors = dict(inputs)
        for name in ENSEMBLES[ensemble].steps:
            runner = self.runners[name]
            step_inputs = {t.name: tensors[t.name] for t in runner.spec.inputs}
            runner.check(step_inputs)
            outputs = runner(step_inputs)
            tensors.update(runner.trim(step_inputs, outputs))
        return tensors

    def embed(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.run(inputs)[wire.USER_EMBEDDING]
