"""The stage registry: every served stage, in ensemble order, one package each.

Everything that handles stages generically (building the repository, loading runners,
swapping, making candidates, generating configs) goes through `get` / `all_stages`; only
a stage's own package and the ensemble wiring (dynemb.ensembles, dynemb.joint) know a
stage by name. A stage's package is imported on first use, so a stage's server process
imports only its own stage (see dynemb.stages.base). Adding a stage: CONTRIBUTING.md.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib import import_module
from pathlib import Path

from dynemb.errors import DynembError
from dynemb.stages.base import Runner, RunnerOptions, Stage

log = logging.getLogger(__name__)

# Stage name -> the package whose `STAGE` it is. Order = the recommend ensemble's steps.
PACKAGES: dict[str, str] = {
    "preprocess": "dynemb.stages.preprocess",
    "text_rnn": "dynemb.stages.text_rnn",
    "image_cnn": "dynemb.stages.image_cnn",
    "label_mlp": "dynemb.stages.label_mlp",
    "temporal_lstm": "dynemb.stages.temporal_lstm",
    "llm_encoder": "dynemb.stages.llm_encoder",
    "retrieve": "dynemb.stages.retrieve",
}
NAMES: tuple[str, ...] = tuple(PACKAGES)


class UnknownStageError(DynembError, KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown stage {name!r}; stages: {', '.join(NAMES)}")

    def __str__(self) -> str:
        return str(self.args[0])


def get(name: str) -> Stage:
    if name not in PACKAGES:
        raise UnknownStageError(name)
    stage = import_module(PACKAGES[name]).STAGE
    if stage.name != name:
        raise RuntimeError(f"{PACKAGES[name]}.STAGE is named {stage.name!r}, not {name!r}")
    return stage


def all_stages() -> dict[str, Stage]:
    return {name: get(name) for name in NAMES}


def trainable(name: str) -> bool:
    """Whether `dynemb train --only` can fine-tune the stage (a torch network)."""
    from dynemb.stages.torch_stage import TorchStage

    return isinstance(get(name), TorchStage)


def load_runner(
    directory: Path,
    verify: bool = True,
    options: RunnerOptions | None = None,
    parameters: Mapping[str, str] | None = None,
    device_id: int | None = None,
) -> Runner:
    """Load one version directory; refuse it if its files are not the ones its manifest
    hashed (`verify`) or its signature is not the stage spec's. The runner's options are
    `options`, else the stage's own defaults overridden by a config's `parameters`; a
    device "cuda" becomes the GPU `device_id` Triton gave the instance."""
    from dynemb.manifest import Manifest

    manifest = Manifest.load(directory)
    if verify:
        manifest.verify(directory)
    stage = get(manifest.stage)
    spec = stage.spec(manifest.dims)
    if manifest.signature != spec.signature:
        raise ValueError(
            f"{directory}: signature {manifest.signature} does not match the {stage.name} "
            f"spec {spec.signature}"
        )
    if options is None:
        options = RunnerOptions.from_parameters(dict(parameters or {}), stage.options)
    options = options.on_device(device_id)
    log.info("loading %s from %s (%s)", stage.name, directory, options)
    return stage.runner(directory, manifest, options)


__all__ = [
    "NAMES",
    "Runner",
    "RunnerOptions",
    "Stage",
    "UnknownStageError",
    "all_stages",
    "get",
    "load_runner",
]
