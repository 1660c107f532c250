"""Build targets: where a model repository runs, and the repository variant each one writes.

The stage specs (dynemb.stages) say what every model computes; a target says how a
repository serves it. Every variant comes from the same specs through `Target.stage_spec`,
and each variant's configs are generated, committed and drift-tested like the CPU ones.

- `cpu` (`model_repository/`, the default): every stage a Python-backend model on CPU
  instances; torch stages through ONNX Runtime with per-item caches.
- `gpu` (`build/variants/gpu/`): the same Python-backend models; the neural stages on
  KIND_GPU instances run their stage-level function in torch on CUDA (precision a config
  parameter), handing tensors to each other on the GPU by DLPack (`dlpack`, switchable so
  that it can be measured with and without); host stages get more instances, and every
  model takes larger batches (users per request and per dynamic batch).
- `triton-container` (`build/variants/triton-container/`): for NVIDIA's container
  (`CONTAINER_IMAGE`). The neural stages are native `onnxruntime_onnx` models over their
  `stage.onnx`, with ONNX Runtime's TensorRT execution accelerator (FP16, an engine cache,
  optimisation profiles from the spec dims), KIND_GPU; preprocess, retrieve and the
  session model stay Python. A native model cannot report its version, so this variant's
  ensembles report the Python stages' versions only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dynemb.dims import Dims
from dynemb.errors import DynembError
from dynemb.specs import NativeModel, StageSpec
from dynemb.stages.base import PRECISIONS, RunnerOptions, Stage

# The Triton 2.51 container (the same pin as deploy/Dockerfile and deploy/k8s).
CONTAINER_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
# Python backend: let Triton hand a model's inputs over where they are (GPU or CPU).
FORCE_CPU_ONLY = "FORCE_CPU_ONLY_INPUT_TENSORS"


class UnknownTargetError(DynembError, KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Target:
    """How a repository serves the stages. Unset sizes keep each stage's own."""

    name: str
    directory: str  # its committed configs, relative to a checkout
    description: str
    device: str = ""  # neural stages: torch on this device ("" = their CPU runners)
    precision: str = "fp32"  # with a device: fp32, bf16 or fp16
    dlpack: bool = False  # with a device: tensors stay on it between neural stages
    native: bool = False  # neural stages native ONNX Runtime models with TensorRT
    max_batch_size: int | None = None  # every model's, the ensembles' too
    neural_instances: int | None = None
    host_instances: int | None = None  # preprocess and retrieve
    # TensorRT (native only): precision, workspace, the batch its profile is tuned for,
    # and where the container keeps built engines (one folder per model).
    trt_precision: str = "FP16"
    trt_workspace_bytes: int = 1 << 30
    trt_opt_batch: int = 256
    trt_cache: str = "/tmp/dynemb-trt"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"{self.name}: precision must be one of {PRECISIONS}")
        if self.native and self.device:
            raise ValueError(f"{self.name}: native models run in their backend, not on a device")

    @property
    def gpu(self) -> bool:
        """Whether its neural stages run on KIND_GPU instances."""
        return self.native or self.device.startswith("cuda")

    def stage_spec(self, stage: Stage, dims: Dims) -> StageSpec:
        """The stage's spec as this target serves it (same tensors, same signature)."""
        spec = stage.spec(dims)
        batch = self.max_batch_size or spec.max_batch_size
        if not stage.neural:
            return replace(
                spec, max_batch_size=batch, instances=self.host_instances or spec.instances
            )
        spec = replace(
            spec, max_batch_size=batch, instances=self.neural_instances or spec.instances
        )
        kind = "KIND_GPU" if self.gpu else spec.instance_kind
        if self.native:
            return replace(
                spec,
                instance_kind=kind,
                parameters=(),
                reports_version=False,
                native=self.native_model(spec),
            )
        if not self.device:
            return spec
        options = RunnerOptions(
            runtime="torch", device=self.device, precision=self.precision, dlpack=self.dlpack
        )
        handover = ((FORCE_CPU_ONLY, "no"),) if self.dlpack else ()
        return replace(spec, instance_kind=kind, parameters=(*options.parameters(), *handover))

    def native_model(self, spec: StageSpec) -> NativeModel:
        """ONNX Runtime over `stage.onnx` with TensorRT: one optimisation profile from one
        user to the largest batch, tuned at `trt_opt_batch` (the spec's dims are fixed, so
        only the batch varies), engines cached per model."""
        from dynemb.stages.torch_stage import STAGE_ONNX

        def shapes(batch: int) -> str:
            return ",".join(
                f"{t.name}:{'x'.join(str(d) for d in (batch, *t.dims))}" for t in spec.inputs
            )

        return NativeModel(
            platform="onnxruntime_onnx",
            model_file=STAGE_ONNX,
            accelerator="tensorrt",
            accelerator_parameters=(
                ("precision_mode", self.trt_precision),
                ("max_workspace_size_bytes", str(self.trt_workspace_bytes)),
                ("trt_engine_cache_enable", "1"),
                ("trt_engine_cache_path", f"{self.trt_cache}/{spec.name}"),
                ("trt_profile_min_shapes", shapes(1)),
                ("trt_profile_opt_shapes", shapes(min(self.trt_opt_batch, spec.max_batch_size))),
                ("trt_profile_max_shapes", shapes(spec.max_batch_size)),
            ),
        )


def plan_spec(spec: StageSpec) -> StageSpec:
    """A native stage as a TensorRT plan (`model.plan`, built from its `stage.onnx` by
    build/triton-container/build_engines.py inside NVIDIA's container) instead of ONNX
    Runtime with TensorRT: the same tensors and batching, platform tensorrt_plan."""
    if spec.native is None:
        raise ValueError(f"{spec.name} is a Python stage, not a native model")
    return replace(spec, native=NativeModel(platform="tensorrt_plan", model_file="model.plan"))


def trtexec_args(spec: StageSpec, onnx: str, plan: str) -> list[str]:
    """trtexec's flags for a native stage's plan: its ONNX Runtime profile's shapes (one
    profile, one user to the largest batch), the same precision and workspace."""
    if spec.native is None:
        raise ValueError(f"{spec.name} is a Python stage, not a native model")
    trt = dict(spec.native.accelerator_parameters)
    precision = {"FP16": ["--fp16"], "FP32": [], "INT8": ["--int8"]}[trt["precision_mode"]]
    workspace_mib = int(trt["max_workspace_size_bytes"]) // 2**20
    return [
        f"--onnx={onnx}",
        f"--saveEngine={plan}",
        *precision,
        f"--memPoolSize=workspace:{workspace_mib}M",
        f"--minShapes={trt['trt_profile_min_shapes']}",
        f"--optShapes={trt['trt_profile_opt_shapes']}",
        f"--maxShapes={trt['trt_profile_max_shapes']}",
    ]


CPU = Target(
    "cpu",
    "model_repository",
    "Python-backend models on CPU instances; torch stages through ONNX Runtime, cached",
)
GPU = Target(
    "gpu",
    "build/variants/gpu",
    "Python-backend models; neural stages in torch on KIND_GPU instances, DLPack between them",
    device="cuda",
    precision="bf16",
    dlpack=True,
    max_batch_size=1024,
    neural_instances=2,
    host_instances=8,
)
TRITON_CONTAINER = Target(
    "triton-container",
    "build/variants/triton-container",
    f"for {CONTAINER_IMAGE}: neural stages native ONNX Runtime models with TensorRT (FP16)",
    native=True,
    max_batch_size=1024,
    neural_instances=2,
    host_instances=8,
)
TARGETS: dict[str, Target] = {t.name: t for t in (CPU, GPU, TRITON_CONTAINER)}


def get(name: str) -> Target:
    if name not in TARGETS:
        raise UnknownTargetError(name)
    return TARGETS[name]
