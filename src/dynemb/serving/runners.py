"""Runners: a stage's loaded artifact behind one call, numpy in and numpy out.

The Triton adapters and the in-process pipeline load stages through the same registry, so
what is served is exactly what the parity tests run locally.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dynemb.features import PreprocessAssets, Preprocessor
from dynemb.manifest import Manifest
from dynemb.specs import StageSpec, stage_specs
from dynemb.stages.retrieve import ItemTable, Retriever, check_top_k
from dynemb_client import contract as wire

log = logging.getLogger(__name__)
WEIGHTS = "weights.pt"


class Runner:
    """`__call__` maps a batch of users (leading axis) to outputs. `per_request` runners are
    called once per request (their work is per user anyway); `check` and `trim` see one
    request's inputs/outputs."""

    per_request = False

    def __init__(self, spec: StageSpec, manifest: Manifest) -> None:
        self.spec = spec
        self.manifest = manifest

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise InputError for a malformed request before it joins a batch."""

    def trim(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict:
        return outputs


class PreprocessRunner(Runner):
    per_request = True

    def __init__(self, spec: StageSpec, manifest: Manifest, directory: Path) -> None:
        super().__init__(spec, manifest)
        self.preprocessor = Preprocessor(PreprocessAssets.load(directory))

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.preprocessor(inputs)


class TorchRunner(Runner):
    def __init__(self, spec: StageSpec, manifest: Manifest, directory: Path) -> None:
        import torch

        super().__init__(spec, manifest)
        # One intra-op thread per instance: instances are processes; scale with their count.
        torch.set_num_threads(1)
        self.torch = torch
        self.module = load_module(manifest, directory)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in self.spec.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        return {self.spec.outputs[0].name: out.numpy()}


class RetrieveRunner(Runner):
    def __init__(self, spec: StageSpec, manifest: Manifest, directory: Path) -> None:
        super().__init__(spec, manifest)
        self.retriever = Retriever(ItemTable.load(directory), manifest.dims_obj().max_top_k)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.retriever(inputs[wire.USER_EMBEDDING])

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        check_top_k(inputs[wire.TOP_K], self.retriever.max_k)

    def trim(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict:
        k = check_top_k(inputs[wire.TOP_K], self.retriever.max_k)
        return {name: value[:, :k] for name, value in outputs.items()}


def load_module(manifest: Manifest, directory: Path):  # -> torch.nn.Module
    import torch

    from dynemb.stages import TORCH_STAGES

    module = TORCH_STAGES[manifest.stage]()(manifest.dims_obj(), **manifest.hparams)
    state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
    module.load_state_dict(state)
    return module.eval()


LOADERS: dict[str, Callable[[StageSpec, Manifest, Path], Runner]] = {
    "preprocess": PreprocessRunner,
    "text_rnn": TorchRunner,
    "image_cnn": TorchRunner,
    "label_mlp": TorchRunner,
    "temporal_lstm": TorchRunner,
    "llm_encoder": TorchRunner,
    "retrieve": RetrieveRunner,
}


def load_runner(directory: Path, verify: bool = True) -> Runner:
    """Load one version directory; refuse it if its signature is not the stage spec's."""
    manifest = Manifest.load(directory)
    if verify:
        manifest.verify(directory)
    spec = stage_specs(manifest.dims_obj())[manifest.stage]
    if manifest.signature != spec.signature:
        raise ValueError(
            f"{directory}: signature {manifest.signature} does not match the {spec.name} spec "
            f"{spec.signature}"
        )
    log.info("loading %s from %s (trained=%s)", manifest.stage, directory, manifest.trained)
    return LOADERS[manifest.stage](spec, manifest, directory)
