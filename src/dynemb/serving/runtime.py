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


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # warnings about unused initializers are noise here
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        feed = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        return self.session.run(None, feed)[0]
