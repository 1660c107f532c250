"""The shared part of every stage served by a torch network.

A torch stage says how to build its network (`network`), which function of it is served
(`served`: the whole network, or its per-row function where the stage caches rows), what
that function's inputs look like (`example_inputs`), and how its runner uses it
(`make_runner`). Saving (`weights.pt` and the ONNX export `model.onnx`, both hashed in
the manifest), loading under either runtime, and candidate-making are the same for all
of them and live here.

Every torch stage also exports its stage-level function (`stage_function`: the spec's
input tensors in, the spec's output out, a dynamic batch of users, fixed L/T/M) as
`stage.onnx`: what NVIDIA's container serves natively (dynemb.targets), and what a
`DeviceRunner` computes in torch on a GPU.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dynemb.dims import Dims
from dynemb.serving import checks
from dynemb.serving.arrays import is_tensor
from dynemb.serving.runtime import RUNTIMES, OnnxRuntime, Runtime, TorchRuntime
from dynemb.stages.base import CandidateChange, ExportContext, Runner, RunnerOptions, Stage

if TYPE_CHECKING:
    from torch import nn

    from dynemb.manifest import Manifest
    from dynemb.serving.cache import RowCache
    from dynemb.specs import StageSpec

WEIGHTS = "weights.pt"
ONNX = "model.onnx"  # the served function (`served`), for the CPU runners
STAGE_ONNX = "stage.onnx"  # the stage-level function (`stage_function`), spec in, spec out
ONNX_OPSET = 17


def check_sequence(spec: StageSpec, mask_name: str, inputs: dict[str, np.ndarray]) -> None:
    """A sequence stage's request: finite floats, real events first in the mask."""
    for tensor in spec.inputs:
        if tensor.dtype == "FP32":
            checks.finite(tensor.name, inputs[tensor.name])
    checks.prefix_mask(mask_name, inputs[mask_name])


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
        check_sequence(self.spec, self.mask_name, inputs)

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


class DeviceRunner(Runner):
    """The stage-level function (`TorchStage.stage_function`, what `stage.onnx` exports) in
    torch on a device, the whole batch in one call at fixed shapes: no per-item cache and no
    cut to the longest history (both pay on a CPU; on a GPU a fixed-shape batch is cheaper
    than Python hashing its rows). fp32 is exact (TF32 off); bf16 and fp16 run under
    autocast, which keeps reductions and normalisations in fp32. Outputs are fp32, on the
    host, or on the device with `dlpack` (the next stage reads them there)."""

    def __init__(
        self,
        spec: StageSpec,
        manifest: Manifest,
        function: nn.Module,
        options: RunnerOptions,
        check: Callable[[dict[str, np.ndarray]], None],
    ) -> None:
        import torch

        super().__init__(spec, manifest)
        self.torch = torch
        self.device = torch.device(options.device)
        if self.device.type == "cpu":
            torch.set_num_threads(1)  # instances are processes: scale with their count
        elif options.precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.function = function.eval().to(self.device)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(options.precision)
        self.options = options
        self.device_inputs = options.dlpack
        self._check = check
        self.input_names = [t.name for t in spec.inputs]

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        self._check(inputs)

    def _tensor(self, value: Any) -> Any:
        torch = self.torch
        if not is_tensor(value):
            value = torch.from_numpy(np.ascontiguousarray(value))
        return value.to(self.device, non_blocking=True)

    def __call__(self, inputs: dict[str, Any]) -> dict[str, Any]:
        torch = self.torch
        args = [self._tensor(inputs[name]) for name in self.input_names]
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.autocast or torch.float32, enabled=bool(self.autocast)
            ),
        ):
            out = self.function(*args)
        out = out.float().contiguous()
        if self.options.dlpack:
            if self.device.type == "cuda":  # the next process reads it on another stream
                torch.cuda.current_stream(self.device).synchronize()
            return {self.spec.outputs[0].name: out}
        return {self.spec.outputs[0].name: out.cpu().numpy()}


class TorchStage(Stage):
    """A stage served by a torch network; artifacts `weights.pt` and `model.onnx`."""

    options: ClassVar[RunnerOptions] = RunnerOptions(runtime="onnxruntime")
    neural = True
    # Inputs (and output) of the served function that have an events axis (axis 1) of
    # any length: a sequence stage's runner cuts a batch to its longest history.
    event_tensors: ClassVar[tuple[str, ...]] = ()
    # A sequence stage's event mask (real events first): its runner cuts batches to the
    # longest history, and its requests are checked for finite floats and that mask.
    sequence_mask: ClassVar[str | None] = None

    @abstractmethod
    def network(self, dims: Dims, params: Any) -> nn.Module:
        """A fresh network (seeded by the caller) for these dims and hyperparameters."""

    def served(self, network: nn.Module) -> nn.Module:
        """The module whose forward the runtimes compute (default: the network itself)."""
        return network

    def exported(self, network: nn.Module) -> nn.Module:
        """The module `model.onnx` exports (the onnxruntime runtime): `served` by default; a
        stage may export an equivalent that computes less, held to `served` (the torch
        runtime) within 1e-4 by the runtime parity tests."""
        return self.served(network)

    def stage_function(self, network: nn.Module) -> nn.Module:
        """The module whose forward is the stage itself: the spec's inputs in order, for a
        batch of users, to its one output (default: the network; a stage whose served
        function is per row wraps it). `stage.onnx` exports it; a DeviceRunner runs it."""
        return network

    def check_inputs(self, manifest: Manifest, inputs: dict[str, np.ndarray]) -> None:
        """Raise InputError for a malformed request before it joins a batch: the same
        checks whichever runner serves the stage (default: a sequence stage's)."""
        if self.sequence_mask is not None:
            check_sequence(self.spec(manifest.dims), self.sequence_mask, inputs)

    def example_inputs(self, dims: Dims) -> dict[str, np.ndarray]:
        """Inputs of the served function, by name, in order: the spec's own by default."""
        return self.spec_example_inputs(dims)

    def spec_example_inputs(self, dims: Dims) -> dict[str, np.ndarray]:
        """Valid inputs of the stage-level function for two users, by name, in order."""
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
        if self.sequence_mask is not None:
            return SequenceRunner(spec, manifest, runtime, self.event_tensors, self.sequence_mask)
        return NetworkRunner(spec, manifest, runtime)

    # --- artifacts ----------------------------------------------------------------------

    def save(self, network: nn.Module, directory: Path) -> None:
        """Write the weights and their two ONNX exports (the manifest hashes all three)."""
        import torch

        directory.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), directory / WEIGHTS)
        dims = network_dims(network)
        self.export_onnx(network, dims, directory / ONNX)
        self.export_stage_onnx(network, dims, directory / STAGE_ONNX)

    def export_onnx(self, network: nn.Module, dims: Dims, path: Path) -> None:
        """The served function, rows (and events, for sequence stages) of any number."""
        example = self.example_inputs(dims)
        output = self.output_name(dims)
        dynamic = {
            name: {0: "rows", 1: "events"} if name in self.event_tensors else {0: "rows"}
            for name in (*example, output)
        }
        _export(self.exported(network.eval()), example, output, dynamic, path)

    def export_stage_onnx(self, network: nn.Module, dims: Dims, path: Path) -> None:
        """The stage-level function: the spec's tensor names, dtypes and dims, a dynamic
        batch axis ("users") and nothing else dynamic (TensorRT builds for fixed L/T/M)."""
        example = self.spec_example_inputs(dims)
        output = self.output_name(dims)
        dynamic = {name: {0: "users"} for name in (*example, output)}
        _export(self.stage_function(network.eval()), example, output, dynamic, path)
        _stamp_dims(path, self.spec(dims))

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
        if options.device:
            if options.runtime != "torch":
                raise ValueError(
                    f"{self.name}: device={options.device} runs torch; set runtime=torch, "
                    f"not {options.runtime!r}"
                )
            function = self.stage_function(self.load_network(directory, manifest))
            check = partial(self.check_inputs, manifest)
            return DeviceRunner(self.spec(manifest.dims), manifest, function, options, check)
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


def _export(
    module: nn.Module, example: dict[str, np.ndarray], output: str, dynamic: dict, path: Path
) -> None:
    import torch

    args = tuple(torch.from_numpy(value) for value in example.values())
    with warnings.catch_warnings(), torch.inference_mode():
        # The TorchScript-based exporter: the torch.export one needs onnxscript, and
        # these networks (GRU, LSTM, BERT) export exactly with it (parity tests).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=list(example),
            output_names=[output],
            dynamic_axes=dynamic,
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


def _stamp_dims(path: Path, spec: StageSpec) -> None:
    """Write the spec's fixed dims into the graph's inputs and outputs (the exporter leaves
    reshaped outputs symbolic), checked by ONNX's strict shape inference: a stamped dim
    that the graph contradicts fails the build, not a server in NVIDIA's container."""
    import onnx

    model = onnx.load(str(path))
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(list(dims)[1:], tensors[value.name].dims, strict=True):
            dim.Clear()
            dim.dim_value = size
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.save(model, str(path))


def network_dims(network: nn.Module) -> Dims:
    """Every stage network keeps the dims it was built with."""
    dims = getattr(network, "dims", None)
    if not isinstance(dims, Dims):
        raise TypeError(f"{type(network).__name__} has no `dims`")
    return dims
