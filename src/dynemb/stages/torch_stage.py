"""The shared part of every stage whose artifact is a torch network's weights.

A torch stage says how to build its network from dims and typed hyperparameters
(`network`); saving, loading, serving and candidate-making of `weights.pt` are the same
for all of them and live here.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynemb.dims import Dims
from dynemb.stages.base import CandidateChange, ExportContext, Runner, Stage

if TYPE_CHECKING:
    from torch import nn

    from dynemb.manifest import Manifest
    from dynemb.specs import StageSpec

WEIGHTS = "weights.pt"


class TorchRunner(Runner):
    """Inputs in the spec's order as tensors, one forward pass, the one output back."""

    def __init__(self, spec: StageSpec, manifest: Manifest, module: nn.Module) -> None:
        import torch

        super().__init__(spec, manifest)
        self.torch = torch
        self.module = module

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in self.spec.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        return {self.spec.outputs[0].name: out.numpy()}


class TorchStage(Stage):
    """A stage served by its torch network; the artifact is `weights.pt` (a state dict)."""

    @abstractmethod
    def network(self, dims: Dims, params: Any) -> nn.Module:
        """A fresh network (seeded by the caller) for these dims and hyperparameters."""

    def save_weights(self, module: nn.Module, directory: Path) -> None:
        import torch

        directory.mkdir(parents=True, exist_ok=True)
        torch.save(module.state_dict(), directory / WEIGHTS)

    def load_network(self, directory: Path, manifest: Manifest) -> nn.Module:
        import torch

        module = self.network(manifest.dims, manifest.hparams)
        state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        return module.eval()

    def export(self, context: ExportContext, directory: Path) -> Any:
        model = context.checkpoint.model
        self.save_weights(model.stages[self.name], directory)
        return model.params.of(self.name)

    def runner(self, directory: Path, manifest: Manifest) -> Runner:
        import torch

        # One intra-op thread per instance: instances are processes; scale with their count.
        torch.set_num_threads(1)
        return TorchRunner(
            self.spec(manifest.dims), manifest, self.load_network(directory, manifest)
        )

    def change(self, directory: Path, manifest: Manifest, change: CandidateChange) -> None:
        import torch

        path = directory / WEIGHTS
        state = torch.load(path, map_location="cpu", weights_only=True)
        if change.kind == "reinit":
            torch.manual_seed(change.seed)
            state = self.network(manifest.dims, manifest.hparams).state_dict()
        elif change.kind == "broken":
            name = next(k for k, v in state.items() if v.dtype.is_floating_point)
            state[name] = torch.zeros(3, 3)  # wrong shape: load_state_dict raises on load
        else:
            generator = torch.Generator().manual_seed(change.seed)
            for name, value in state.items():
                if value.dtype.is_floating_point and value.numel() > 1:
                    noise = torch.randn(value.shape, generator=generator) * value.std()
                    state[name] = value + change.scale * noise
            if change.kind == "nan":  # the output layer's bias: every output becomes NaN
                name = [k for k, v in state.items() if v.dtype.is_floating_point][-1]
                state[name] = torch.full_like(state[name], float("nan"))
        torch.save(state, path)
