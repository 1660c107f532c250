"""Runtimes: the function a torch stage serves, behind one call, numpy in and numpy out.

`torch` runs the stage's network eagerly; `onnxruntime` runs the ONNX graph exported
from the same weights at build time (`model.onnx`, named tensors, dynamic batch axis).
Both take one intra-op thread: instances are processes; scale with their count. Which
one a stage uses is a parameter of its config (`runtime`), defaulting to the one measured
fastest for it (benchmarks/results/runtimes.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

RUNTIMES = ("torch", "onnxruntime")


class Runtime(Protocol):
    name: str

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Named inputs -> the one output."""


class TorchRuntime:
    name = "torch"

    def __init__(self, function: Any, input_names: Sequence[str]) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        self.function = function.eval()
        self.input_names = list(input_names)

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names]
        with torch.inference_mode():
            return self.function(*args).numpy()


def _ort_session(model: Path | bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads (instances are
    processes: scale with their count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers are noise here
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1) -> None:
        self.session = _ort_session(path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        return self.session.run(None, feed)[0]


class OnnxFunction:
    """A torch module's forward, exported to ONNX in memory when it is built and run by
    ONNX Runtime: for functions made at load time from a loaded version's weights (a
    session's steps), which ship no artifact of their own. Named inputs (numpy) -> the
    outputs, in order. Axes named in `dynamic` may change between calls."""

    def __init__(
        self,
        module: Any,
        example: dict[str, Any],
        outputs: Sequence[str],
        dynamic: dict[str, dict[int, str]],
        threads: int = 1,
    ) -> None:
        import io
        import warnings

        import torch

        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the tracer's notes on shape arithmetic
            torch.onnx.export(
                module.eval(),
                tuple(example.values()),
                buffer,
                input_names=list(example),
                output_names=list(outputs),
                dynamic_axes=dynamic,
                opset_version=17,
                dynamo=False,
            )
        self.session = _ort_session(buffer.getvalue(), threads)
        self.input_names = list(example)

    def __call__(self, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(
            None, {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        )


def on_runtime(step: Any, runtime: str, what: str) -> Any:
    """A session step (`EncoderStep`, `LSTMStep`) set to run on `runtime`: "torch" as it
    is, "onnxruntime" through its `use_onnxruntime()`."""
    if runtime == "onnxruntime":
        step.use_onnxruntime()
    elif runtime != "torch":
        raise ValueError(f"{what}: runtime must be torch or onnxruntime, not {runtime!r}")
    return step
