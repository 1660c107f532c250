"""Typed specs: what every Triton model reads and writes, and how it is batched.

Each stage declares its own `StageSpec` in its module (dynemb.stages.<name>); the tensors
that cross stage boundaries are named once in dynemb.tensors; the ensembles' wiring is
derived from the stage specs (dynemb.ensembles). The committed `config.pbtxt` files are
generated from these specs (dynemb.configs), and the adapters validate requests against
them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dynemb_client import contract as wire

# Triton data types <-> numpy. BYTES travels as numpy object arrays of bytes.
NUMPY_DTYPES: dict[str, type] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of NUMPY_DTYPES
    dims: tuple[int, ...]  # per-user shape, without the batch dimension; -1 = variable

    def __post_init__(self) -> None:
        if self.dtype not in NUMPY_DTYPES:
            raise ValueError(f"{self.name}: unknown dtype {self.dtype}")

    @property
    def numpy_dtype(self) -> type:
        return NUMPY_DTYPES[self.dtype]

    def to_json(self) -> list[Any]:
        return [self.name, self.dtype, list(self.dims)]

    @classmethod
    def from_json(cls, raw: list[Any]) -> TensorSpec:
        name, dtype, dims = raw
        return cls(name, dtype, tuple(int(d) for d in dims))


@dataclass(frozen=True)
class Signature:
    """A stage's input and output tensors: stored in each version's manifest, compared
    with the stage spec on load and on swap."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, list[list[Any]]]:
        return {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, raw: dict[str, list[list[Any]]]) -> Signature:
        return cls(
            tuple(TensorSpec.from_json(t) for t in raw["inputs"]),
            tuple(TensorSpec.from_json(t) for t in raw["outputs"]),
        )

    def widened(self) -> Signature:
        """The same signature with one more channel on the first output (a drill that a
        swap must refuse)."""
        first = self.outputs[0]
        wider = replace(first, dims=(*first.dims[:-1], first.dims[-1] + 1))
        return replace(self, outputs=(wider, *self.outputs[1:]))

    def __str__(self) -> str:
        show = lambda ts: ", ".join(f"{t.name}:{t.dtype}{list(t.dims)}" for t in ts)  # noqa: E731
        return f"({show(self.inputs)}) -> ({show(self.outputs)})"


@dataclass(frozen=True)
class NativeModel:
    """A stage served by one of Triton's own backends instead of Python (NVIDIA's container:
    dynemb.targets): its platform, the artifact file in its version directory, and the GPU
    execution accelerator with its parameters (e.g. TensorRT's precision and profiles)."""

    platform: str  # e.g. "onnxruntime_onnx"
    model_file: str  # e.g. "stage.onnx" (config: default_model_filename)
    accelerator: str = ""  # e.g. "tensorrt"; "" = the backend's plain GPU provider
    accelerator_parameters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class StageSpec:
    """One Triton model, batched over users: served by the Python backend (the adapter),
    or natively by another backend where `native` says how."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 32
    instances: int = 1
    instance_kind: str = "KIND_CPU"
    max_queue_delay_us: int = 0
    description: str = ""
    # Free-form model parameters written into config.pbtxt (the runtime, cache bounds):
    # the adapter reads them back into the stage's typed RunnerOptions.
    parameters: tuple[tuple[str, str], ...] = ()
    # Whether the model also outputs `version_output` (every Python stage does; the session
    # model reports the versions of the stages it runs among its own outputs; a native
    # model cannot).
    reports_version: bool = True
    native: NativeModel | None = None

    def __post_init__(self) -> None:
        if self.instance_kind not in INSTANCE_KINDS:
            raise ValueError(f"{self.name}: instance_kind must be one of {INSTANCE_KINDS}")

    def input(self, name: str) -> TensorSpec:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise KeyError(f"{self.name} has no input {name!r}")

    @property
    def signature(self) -> Signature:
        return Signature(self.inputs, self.outputs)

    @property
    def version_output(self) -> TensorSpec:
        """The version of this stage that computed a response, per user. Served beside
        the outputs, not part of the signature: the adapter adds it to every version."""
        return TensorSpec(wire.version_output(self.name), "INT64", (1,))

    @property
    def served_outputs(self) -> tuple[TensorSpec, ...]:
        """What the Triton model outputs: the signature's outputs and its version."""
        return (*self.outputs, self.version_output) if self.reports_version else self.outputs


@dataclass(frozen=True)
class EnsembleSpec:
    name: str
    steps: tuple[str, ...]  # stage names in execution order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 32
