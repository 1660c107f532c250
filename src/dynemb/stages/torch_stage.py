"""The shared part of every stage served by a torch network.

A torch stage says how to build its network (`network`), which function of it is served
(`served`: the whole network, or its per-row function where the stage caches rows), what
that function's inputs look like (`example_inputs`), and how its runner uses it
(`make_runner`). Saving (`weights.pt` and the ONNX export `model.onnx`, both hashed in
the manifest), loading under either runtime, and candidate-making are the same for all
of them and live here.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dynemb.dims import Dims
from dynemb.serving import checks
from dynemb.serving.runtime import RUNTIMES, OnnxRuntime, Runtime, TorchRuntime
from dynemb.stages.base import CandidateChange, ExportContext, Runner, RunnerOptions, Stage

if TYPE_CHECKING:
    from torch import nn

    from dynemb.manifest import Manifest
    from dynemb.serving.cache import RowCache
    from dynemb.specs import StageSpec

WEIGHTS = "weights.pt"
ONNX = "model.onnx"
ONNX_OPSET = 17


class NetworkRunner(Runner):
    """The whole batch through the runtime in one call (stages without row caches)."""

    def __init__(self, spec: StageSpec, manifest: Manifest, runtime: Runtime) -> None:
        super().__init__(spec, manifest)
        self.runtime = runtime

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.spec.outputs[0].name: self.runtime(inputs)}


class RowCacheRunner(Runner):
    """Per-item rows (a text's vector, an image's) through the runtime, each distinct row
    once a batch and not at all when its stage version's cache has it. Subclasses write
    `__call__` with `dynemb.serving.cache.cached_rows` and name their cache."""

    cache_name: ClassVar[str]

    def __init__(
        self, spec: StageSpec, manifest: Manifest, runtime: Runtime, cache: RowCache | None
    ) -> None:
        super().__init__(spec, manifest)
        self.runtime = runtime
        self.cache = cache

    def caches(self) -> dict[str, RowCache]:
        return {self.cache_name: self.cache} if self.cache is not None else {}


class SequenceRunner(NetworkRunner):
    """A batch of histories cut to its longest one before the runtime (padding sits after
    the real events and the stages are causal, so the cut changes no real output), and the
    output padded back to L events with zeros if it has an events axis."""

    def __init__(
        self,
        spec: StageSpec,
        manifest: Manifest,
        runtime: Runtime,
        event_tensors: tuple[str, ...],
        mask_name: str,
    ) -> None:
        super().__init__(spec, manifest, runtime)
        self.event_tensors = set(event_tensors)
        self.mask_name = mask_name

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        for tensor in self.spec.inputs:
            if tensor.dtype == "FP32":
                checks.finite(tensor.name, inputs[tensor.name])
        checks.prefix_mask(self.mask_name, inputs[self.mask_name])

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = inputs[self.mask_name]
        events = mask.shape[1]
        longest = max(1, int(mask.sum(axis=1).max())) if mask.size else 1
        cut = {
            name: value[:, :longest] if name in self.event_tensors else value
            for name, value in inputs.items()
        }
        out = self.runtime(cut)
        output = self.spec.outputs[0]
        if output.name in self.event_tensors and longest < events:
            padded = np.zeros((out.shape[0], events, *out.shape[2:]), dtype=out.dtype)
            padded[:, :longest] = out
            out = padded
        return {output.name: out}


class TorchStage(Stage):
    """A stage served by a torch network; artifacts `weights.pt` and `model.onnx`."""

    options: ClassVar[RunnerOptions] = RunnerOptions(runtime="onnxruntime")
    # Inputs (and output) of the served function that have an events axis (axis 1) of
    # any length: a sequence stage's runner cuts a batch to its longest history.
    event_tensors: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def network(self, dims: Dims, params: Any) -> nn.Module:
        """A fresh network (seeded by the caller) for these dims and hyperparameters."""

    def served(self, network: nn.Module) -> nn.Module:
        """The module whose forward the runtimes compute (default: the network itself)."""
        return network

    def example_inputs(self, dims: Dims) -> dict[str, np.ndarray]:
        """Inputs of the served function, by name, in order: the spec's own by default."""
        spec = self.spec(dims)
        rng = np.random.default_rng(0)
        out = {}
        for tensor in spec.inputs:
            shape = (2, *tensor.dims)
            if tensor.dtype == "BOOL":
                out[tensor.name] = np.ones(shape, dtype=bool)
            elif tensor.dtype == "FP32":
                out[tensor.name] = rng.standard_normal(shape).astype(np.float32)
            else:
                out[tensor.name] = np.ones(shape, dtype=tensor.numpy_dtype)
        return out

    def output_name(self, dims: Dims) -> str:
        return self.spec(dims).outputs[0].name

    # The runner class of a stage that caches rows (its `make_runner` builds it).
    row_runner: ClassVar[type[RowCacheRunner] | None] = None

    def make_runner(
        self, spec: StageSpec, manifest: Manifest, runtime: Runtime, options: RunnerOptions
    ) -> Runner:
        if self.row_runner is not None:
            return self.row_runner(spec, manifest, runtime, options.cache())
        return NetworkRunner(spec, manifest, runtime)

    # --- artifacts ----------------------------------------------------------------------

    def save(self, network: nn.Module, directory: Path) -> None:
        """Write the weights and their ONNX export (the manifest hashes both)."""
        import torch

        directory.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), directory / WEIGHTS)
        self.export_onnx(network, network_dims(network), directory / ONNX)

    def export_onnx(self, network: nn.Module, dims: Dims, path: Path) -> None:
        import torch

        example = self.example_inputs(dims)
        names = list(example)
        output = self.output_name(dims)
        dynamic = {
            name: {0: "rows", 1: "events"} if name in self.event_tensors else {0: "rows"}
            for name in (*names, output)
        }
        args = tuple(torch.from_numpy(value) for value in example.values())
        with warnings.catch_warnings(), torch.inference_mode():
            # The TorchScript-based exporter: the torch.export one needs onnxscript, and
            # these networks (GRU, LSTM, BERT) export exactly with it (parity tests).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                self.served(network.eval()),
                args,
                str(path),
                input_names=names,
                output_names=[output],
                dynamic_axes=dynamic,
                opset_version=ONNX_OPSET,
                dynamo=False,
            )

    def load_network(self, directory: Path, manifest: Manifest) -> nn.Module:
        import torch

        module = self.network(manifest.dims, manifest.hparams)
        state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        return module.eval()

    def runtime(self, directory: Path, manifest: Manifest, name: str) -> Runtime:
        if name == "onnxruntime":
            return OnnxRuntime(directory / ONNX)
        if name == "torch":
            network = self.load_network(directory, manifest)
            names = list(self.example_inputs(manifest.dims))
            return TorchRuntime(self.served(network), names)
        raise ValueError(f"{self.name}: runtime must be one of {RUNTIMES}, got {name!r}")

    def export(self, context: ExportContext, directory: Path) -> Any:
        model = context.checkpoint.model
        self.save(model.stages[self.name], directory)
        return model.params.of(self.name)

    def runner(self, directory: Path, manifest: Manifest, options: RunnerOptions) -> Runner:
        runtime = self.runtime(directory, manifest, options.runtime)
        return self.make_runner(self.spec(manifest.dims), manifest, runtime, options)

    def change(self, directory: Path, manifest: Manifest, change: CandidateChange) -> None:
        import torch

        state = torch.load(directory / WEIGHTS, map_location="cpu", weights_only=True)
        if change.kind == "broken":
            name = next(k for k, v in state.items() if v.dtype.is_floating_point)
            state[name] = torch.zeros(3, 3)  # wrong shape: load_state_dict raises on load
            torch.save(state, directory / WEIGHTS)
            (directory / ONNX).write_bytes(b"not an ONNX model")  # and the session fails
            return
        network = self.network(manifest.dims, manifest.hparams)
        if change.kind == "reinit":
            torch.manual_seed(change.seed)
            network = self.network(manifest.dims, manifest.hparams)
        else:
            generator = torch.Generator().manual_seed(change.seed)
            for name, value in state.items():
                if value.dtype.is_floating_point and value.numel() > 1:
                    noise = torch.randn(value.shape, generator=generator) * value.std()
                    state[name] = value + change.scale * noise
            if change.kind == "nan":  # the output layer's bias: every output becomes NaN
                name = [k for k, v in state.items() if v.dtype.is_floating_point][-1]
                state[name] = torch.full_like(state[name], float("nan"))
            network.load_state_dict(state)
        self.save(network, directory)


def network_dims(network: nn.Module) -> Dims:
    """Every stage network keeps the dims it was built with."""
    dims = getattr(network, "dims", None)
    if not isinstance(dims, Dims):
        raise TypeError(f"{type(network).__name__} has no `dims`")
    return dims
