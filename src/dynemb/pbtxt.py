"""Write `config.pbtxt` files from the stage specs through Triton's own protobuf schema."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dynemb.config import DIMS, Dims
from dynemb.specs import EnsembleSpec, StageSpec, TensorSpec, ensemble_specs, stage_specs

_DTYPES = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
}

HEADER = "# Generated from dynemb.specs by `dynemb configs`; do not edit by hand.\n"


def _io(tensor: TensorSpec, cls: type) -> object:
    return cls(name=tensor.name, data_type=_DTYPES[tensor.dtype], dims=list(tensor.dims))


def stage_config(spec: StageSpec) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, backend="python", max_batch_size=spec.max_batch_size)
    config.input.extend(_io(t, mc.ModelInput) for t in spec.inputs)
    config.output.extend(_io(t, mc.ModelOutput) for t in spec.outputs)
    config.dynamic_batching.max_queue_delay_microseconds = spec.max_queue_delay_us
    config.instance_group.append(
        mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=spec.instances)
    )
    # Only the newest version serves: a swap is "write version N+1, load".
    config.version_policy.latest.num_versions = 1
    return config


def ensemble_config(spec: EnsembleSpec, stages: dict[str, StageSpec]) -> mc.ModelConfig:
    config = mc.ModelConfig(name=spec.name, platform="ensemble", max_batch_size=spec.max_batch_size)
    config.input.extend(_io(t, mc.ModelInput) for t in spec.inputs)
    config.output.extend(_io(t, mc.ModelOutput) for t in spec.outputs)
    for name in spec.steps:
        stage = stages[name]
        step = config.ensemble_scheduling.step.add(model_name=name, model_version=-1)
        for tensor in stage.inputs:
            step.input_map[tensor.name] = tensor.name
        for tensor in stage.outputs:
            step.output_map[tensor.name] = tensor.name
    return config


def render(config: mc.ModelConfig) -> str:
    text = text_format.MessageToString(config)
    if "max_batch_size" not in text:  # protobuf drops zeros; Triton must see it explicitly
        text = f"max_batch_size: {config.max_batch_size}\n" + text
    return HEADER + text


def all_configs(dims: Dims = DIMS) -> dict[str, str]:
    """Model name -> config.pbtxt text, for every stage and ensemble."""
    stages = stage_specs(dims)
    configs = {name: render(stage_config(spec)) for name, spec in stages.items()}
    for name, spec in ensemble_specs(dims).items():
        configs[name] = render(ensemble_config(spec, stages))
    return configs


def write_configs(repository: Path, dims: Dims = DIMS) -> list[Path]:
    written = []
    for name, text in all_configs(dims).items():
        path = repository / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
