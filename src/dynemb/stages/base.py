"""What every stage is: a typed spec, typed hyperparameters, an artifact it writes and
loads, a runner that serves it, and the candidates an operator can make of it.

A stage lives in one package, dynemb.stages.<name>, whose `__init__` defines its `Stage`
and imports nothing heavy at module level (a stage's server process imports only its own
stage, so preprocess and retrieve never import torch and only llm_encoder imports
transformers). The registry (dynemb.stages) is the only way in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from dynemb.dims import Dims
from dynemb.serving.cache import RowCache
from dynemb.specs import StageSpec, TensorSpec
from dynemb.tensors import Tensors

if TYPE_CHECKING:
    from dynemb.checkpoint import Checkpoint
    from dynemb.data.types import Dataset
    from dynemb.manifest import Manifest

CandidateKind = Literal["perturb", "reinit", "nan", "broken", "signature"]
CANDIDATE_KINDS: tuple[str, ...] = ("perturb", "reinit", "nan", "broken", "signature")


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class RunnerOptions:
    """How a stage's runner serves: its runtime (torch stages) and its per-item cache
    bound (0 = no cache). A stage sets its defaults; they are written into its
    config.pbtxt as parameters, which the server hands back to the adapter.

    `device` moves a torch stage off its CPU runners: it then serves its stage-level
    function (the one `stage.onnx` exports: the spec's tensors in, the spec's out) in torch
    on that device ("cpu", "cuda" or "cuda:N"), at `precision` (fp32 exact; bf16 or fp16
    under autocast), the whole batch in one call. With `dlpack` its outputs stay on the
    device and its inputs may arrive there (Triton hands GPU tensors between stages by
    DLPack where the config says FORCE_CPU_ONLY_INPUT_TENSORS "no")."""

    runtime: str = ""  # torch stages: "torch" or "onnxruntime" (dynemb.serving.runtime)
    cache_entries: int = 0
    cache_mb: float = 0.0
    device: str = ""  # torch stages: "" = the CPU runners above; else torch on this device
    precision: str = "fp32"  # with a device: one of PRECISIONS
    dlpack: bool = False  # with a device: tensors stay on it between stages

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if (self.precision != "fp32" or self.dlpack) and not self.device:
            raise ValueError("precision and dlpack need a device (device=cpu|cuda)")

    def parameters(self) -> tuple[tuple[str, str], ...]:
        runtime = (("runtime", self.runtime),) if self.runtime else ()
        device = (
            (
                ("device", self.device),
                ("precision", self.precision),
                ("dlpack", "true" if self.dlpack else "false"),
            )
            if self.device
            else ()
        )
        return (
            *runtime,
            ("cache_entries", str(self.cache_entries)),
            ("cache_mb", f"{self.cache_mb:g}"),
            *device,
        )

    @classmethod
    def from_parameters(cls, raw: dict[str, str], default: RunnerOptions) -> RunnerOptions:
        """Options from a config's parameters; absent ones keep `default`'s values."""
        try:
            dlpack = raw.get("dlpack", "true" if default.dlpack else "false").lower()
            if dlpack not in ("true", "false"):
                raise ValueError(f"dlpack must be true or false, got {dlpack!r}")
            return cls(
                runtime=raw.get("runtime", default.runtime),
                cache_entries=int(raw.get("cache_entries", default.cache_entries)),
                cache_mb=float(raw.get("cache_mb", default.cache_mb)),
                device=raw.get("device", default.device),
                precision=raw.get("precision", default.precision),
                dlpack=dlpack == "true",
            )
        except ValueError as exc:
            raise ValueError(f"bad runner parameters {raw}: {exc}") from exc

    def on_device(self, device_id: int | None) -> RunnerOptions:
        """The same options with "cuda" made "cuda:N" for the GPU Triton gave an instance."""
        if self.device == "cuda" and device_id is not None:
            return replace(self, device=f"cuda:{device_id}")
        return self

    def cache(self) -> RowCache | None:
        if self.cache_entries <= 0 or self.cache_mb <= 0:
            return None
        return RowCache(self.cache_entries, int(self.cache_mb * 2**20))


class Runner:
    """A loaded version behind one call, numpy in and numpy out. `__call__` maps a batch
    of users (leading axis) to outputs; `check` and `trim` see one request's tensors."""

    # Whether `__call__` and `check` take torch tensors that live on a device (handed over
    # by DLPack) besides numpy arrays; callers convert for runners that do not.
    device_inputs = False

    def __init__(self, spec: StageSpec, manifest: Manifest) -> None:
        self.spec = spec
        self.manifest = manifest

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def check(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise InputError for a malformed request before it joins a batch."""

    def trim(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict:
        return outputs

    def caches(self) -> dict[str, RowCache]:
        """The runner's per-item caches by name (for metrics and benchmarks)."""
        return {}


@dataclass(frozen=True)
class ExportContext:
    """What `dynemb build` hands every stage: the model to export and the catalogue whose
    items fill the item table."""

    checkpoint: Checkpoint
    catalogue: Dataset


@dataclass(frozen=True)
class CandidateChange:
    """How `dynemb candidate` changes a copy of the serving version: perturb (relative
    Gaussian noise), reinit (fresh seeded weights), nan (outputs become NaN), broken (an
    artifact that fails to load), signature (one more output channel)."""

    kind: CandidateKind = "perturb"
    scale: float = 0.01
    seed: int = 0


class Stage(ABC):
    """One served model. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    params_type: ClassVar[type]  # the typed hyperparameters, a dataclass
    learned: ClassVar[bool] = True  # its artifact holds trained weights (preprocess: no)
    # A neural network (torch stages): it can run on a GPU, and it exports its stage-level
    # ONNX (`stage.onnx`), which NVIDIA's container serves natively (dynemb.targets).
    neural: ClassVar[bool] = False
    options: ClassVar[RunnerOptions] = RunnerOptions()  # serving defaults (config parameters)
    # Dynamic batching (benchmarks/results/serving.md): no queue delay, since under load a
    # busy instance's queue fills by itself and at low load a delay is paid at every level
    # of the ensemble (p50 at one client 7.6 -> 6.4 ms without it).
    instances: ClassVar[int] = 1
    max_batch_size: ClassVar[int] = 32
    max_queue_delay_us: ClassVar[int] = 0
    # Kinds of `CandidateChange` this stage can make ("signature" works for every stage).
    candidate_kinds: ClassVar[tuple[str, ...]] = CANDIDATE_KINDS

    @abstractmethod
    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(inputs, outputs), picked from the ensembles' named tensors."""

    def spec(self, dims: Dims) -> StageSpec:
        """The tensors it reads and writes, how it is batched, its serving options."""
        inputs, outputs = self.tensors(Tensors(dims))
        return StageSpec(
            self.name,
            inputs,
            outputs,
            max_batch_size=self.max_batch_size,
            instances=self.instances,
            max_queue_delay_us=self.max_queue_delay_us,
            description=self.description,
            parameters=self.options.parameters(),
        )

    def probe_inputs(self, dims: Dims) -> dict[str, np.ndarray]:
        """One valid request of one user, cheap to answer: what the stage supervisor sends
        to tell a healthy stage process from a dead or hung one. Zeros (an empty history)
        are valid for every stage unless it says otherwise."""
        return {
            t.name: np.zeros((1, *t.dims), dtype=t.numpy_dtype)
            if t.dtype != "BYTES"
            else np.full((1, *t.dims), b"", dtype=object)
            for t in self.spec(dims).inputs
        }

    @abstractmethod
    def export(self, context: ExportContext, directory: Path) -> Any:
        """Write the artifact into a version directory; return the hyperparameters."""

    @abstractmethod
    def runner(self, directory: Path, manifest: Manifest, options: RunnerOptions) -> Runner:
        """Load a version directory (already checked against its manifest)."""

    @abstractmethod
    def change(self, directory: Path, manifest: Manifest, change: CandidateChange) -> None:
        """Turn a copy of a version directory into a candidate (`change.kind` is one of
        `candidate_kinds`, never "signature"); update `manifest` in place if needed."""

    def __repr__(self) -> str:
        return f"<stage {self.name}>"
