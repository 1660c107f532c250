"""The committed config.pbtxt and model.py files are exactly what the stage specs generate,
for the CPU repository and for every build target's variant (dynemb.targets)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dynemb import stages, targets
from dynemb.configs import adapters, all_configs, write_configs
from dynemb.dims import DIMS
from dynemb.ensembles import ENSEMBLE_SPECS, STAGE_SPECS, ensemble_specs, stage_specs

CHECKOUT_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"


def test_committed_configs_match_specs():
    generated = all_configs()
    for name, text in generated.items():
        path = CHECKOUT_REPOSITORY / name / "config.pbtxt"
        assert path.exists(), f"{path} missing: run `dynemb configs`"
        assert path.read_text(encoding="utf-8") == text, f"{path} drifted: run `dynemb configs`"
    on_disk = {p.parent.name for p in CHECKOUT_REPOSITORY.glob("*/config.pbtxt")}
    assert on_disk == set(generated), "a model folder has no spec (or a spec no folder)"


def test_committed_adapters_are_generated():
    for relative, text in adapters().items():
        path = CHECKOUT_REPOSITORY / relative
        assert path.read_text(encoding="utf-8") == text, f"{path} drifted: run `dynemb configs`"
    on_disk = {p.relative_to(CHECKOUT_REPOSITORY) for p in CHECKOUT_REPOSITORY.glob("*/*/model.py")}
    assert on_disk == set(adapters()), "a model.py that no stage generates (or one missing)"


def test_a_fresh_repository_is_complete_without_the_checkout(tmp_path):
    """What a `pip install .` user gets from `dynemb configs`: every model folder, config,
    adapter and version directory, from the package alone."""
    written = write_configs(tmp_path / "repo")
    for name in (*stages.NAMES, *ENSEMBLE_SPECS):
        assert (tmp_path / "repo" / name / "config.pbtxt") in written
        assert (tmp_path / "repo" / name / "1").is_dir()
    for name in stages.NAMES:
        assert "StageAdapter" in (tmp_path / "repo" / name / "1" / "model.py").read_text()


def test_configs_parse_and_say_batch_size_and_batching():
    for name, text in all_configs().items():
        config = text_format.Parse(text, mc.ModelConfig())
        assert config.name == name
        assert "max_batch_size: 32" in text
        if name in STAGE_SPECS:
            assert config.HasField("dynamic_batching")
            assert config.backend == "python"
            assert config.instance_group[0].count == STAGE_SPECS[name].instances


def test_ensemble_steps_are_fed_by_earlier_steps_or_ensemble_inputs():
    for ensemble in ENSEMBLE_SPECS.values():
        available = {t.name for t in ensemble.inputs}
        for step in ensemble.steps:
            stage = STAGE_SPECS[step]
            missing = {t.name for t in stage.inputs} - available
            assert not missing, f"{ensemble.name}/{step} needs {missing}"
            available |= {t.name for t in stage.served_outputs}
        assert {t.name for t in ensemble.outputs} <= available


def test_ensembles_report_the_version_of_every_step_and_never_consume_an_output():
    for ensemble in ENSEMBLE_SPECS.values():
        outputs = {t.name for t in ensemble.outputs}
        versions = {STAGE_SPECS[step].version_output.name for step in ensemble.steps}
        assert versions <= outputs, f"{ensemble.name} hides a step's version"
        # An ensemble output that a later step also reads deadlocks Triton 2.51 when a
        # client asks for only some of the outputs.
        consumed = {t.name for step in ensemble.steps for t in STAGE_SPECS[step].inputs}
        assert not outputs & consumed, f"{ensemble.name} outputs {outputs & consumed}"


def test_the_session_model_reports_the_versions_of_its_own_stages():
    from dynemb.sessions.engine import SESSION_STAGES
    from dynemb.sessions.spec import session_spec

    spec = session_spec(DIMS)
    reported = {t.name for t in spec.served_outputs if t.name.endswith("_VERSION")}
    assert reported == {STAGE_SPECS[name].version_output.name for name in SESSION_STAGES}


def test_stage_tensors_have_consistent_shapes_across_steps():
    produced = {}
    for stage in STAGE_SPECS.values():
        for tensor in stage.outputs:
            produced[tensor.name] = tensor
    for stage in STAGE_SPECS.values():
        for tensor in stage.inputs:
            if tensor.name in produced:
                assert produced[tensor.name] == tensor, f"{stage.name}.{tensor.name} mismatch"


# --- build targets: the gpu and triton-container variants come from the same specs -----

VARIANTS = [t for t in targets.TARGETS.values() if t is not targets.CPU]
CHECKOUT = CHECKOUT_REPOSITORY.parent


@pytest.mark.parametrize("target", VARIANTS, ids=lambda t: t.name)
def test_committed_variant_configs_match_specs(target):
    generated = all_configs(target=target)
    directory = CHECKOUT / target.directory
    for name, text in generated.items():
        path = directory / name / "config.pbtxt"
        assert path.exists(), f"{path} missing: run `dynemb configs`"
        assert path.read_text(encoding="utf-8") == text, f"{path} drifted: run `dynemb configs`"
    on_disk = {p.parent.name for p in directory.glob("*/config.pbtxt")}
    assert on_disk == set(generated), "a variant model folder has no spec (or a spec no folder)"


@pytest.mark.parametrize("target", list(targets.TARGETS.values()), ids=lambda t: t.name)
def test_every_target_wires_fed_steps_and_batches_no_larger_than_its_steps(target):
    specs = stage_specs(target=target)
    for ensemble in ensemble_specs(target=target).values():
        available = {t.name for t in ensemble.inputs}
        for step in ensemble.steps:
            stage = specs[step]
            assert not {t.name for t in stage.inputs} - available, f"{ensemble.name}/{step}"
            available |= {t.name for t in stage.served_outputs}
            assert ensemble.max_batch_size <= stage.max_batch_size, f"{ensemble.name}/{step}"
        assert {t.name for t in ensemble.outputs} <= available
        reported = {
            specs[s].version_output.name for s in ensemble.steps if specs[s].reports_version
        }
        versions = {t.name for t in ensemble.outputs if t.name.endswith("_VERSION")}
        assert versions == reported, f"{target.name}/{ensemble.name}: {versions} vs {reported}"
    for name, spec in specs.items():  # the same tensors in every target: one signature
        assert spec.signature == STAGE_SPECS[name].signature, f"{target.name}/{name}"


def parsed(target) -> dict[str, mc.ModelConfig]:
    return {
        name: text_format.Parse(text, mc.ModelConfig())
        for name, text in all_configs(target=target).items()
    }


def test_gpu_variant_runs_neural_stages_in_torch_on_gpu_instances_with_dlpack():
    for name, config in parsed(targets.GPU).items():
        if name not in STAGE_SPECS:
            continue
        assert config.backend == "python" and config.max_batch_size == 1024
        group = config.instance_group[0]
        parameters = {k: v.string_value for k, v in config.parameters.items()}
        if stages.get(name).neural:
            assert group.kind == mc.ModelInstanceGroup.KIND_GPU, name
            assert parameters["runtime"] == "torch" and parameters["device"] == "cuda"
            assert parameters["precision"] == "bf16" and parameters["dlpack"] == "true"
            assert parameters["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no", name
        else:
            assert group.kind == mc.ModelInstanceGroup.KIND_CPU, name
            assert group.count == targets.GPU.host_instances
            assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in parameters  # host stages read numpy


def test_gpu_variant_without_dlpack_drops_the_handover_and_says_so():
    target = dataclasses.replace(targets.GPU, dlpack=False)
    config = parsed(target)["llm_encoder"]
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters["dlpack"] == "false" and "FORCE_CPU_ONLY_INPUT_TENSORS" not in parameters


def test_triton_container_variant_serves_neural_stages_natively_with_tensorrt():
    configs = parsed(targets.TRITON_CONTAINER)
    for name in stages.NAMES:
        config = configs[name]
        if not stages.get(name).neural:
            assert config.backend == "python", name
            continue
        assert config.platform == "onnxruntime_onnx" and not config.backend, name
        assert config.default_model_filename == "stage.onnx"
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
        assert not any(o.name.endswith("_VERSION") for o in config.output), name
        [trt] = config.optimization.execution_accelerators.gpu_execution_accelerator
        assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
        assert trt.parameters["trt_engine_cache_enable"] == "1"
        assert trt.parameters["trt_engine_cache_path"].endswith(f"/{name}")
        inputs = {i.name: list(i.dims) for i in config.input}
        for key, batch in (("min", 1), ("opt", 256), ("max", config.max_batch_size)):
            profile = dict(
                p.split(":") for p in trt.parameters[f"trt_profile_{key}_shapes"].split(",")
            )
            assert set(profile) == set(inputs), f"{name} {key}"
            for tensor, shape in profile.items():
                assert [int(d) for d in shape.split("x")] == [batch, *inputs[tensor]]


def test_tensorrt_plan_recipe_matches_the_container_variant():
    """The engine recipe (build/triton-container/build_engines.py) builds each plan for the
    shapes the variant's config serves, and writes a config Triton accepts for it."""
    from dynemb.configs import stage_config

    for name in stages.NAMES:
        spec = targets.TRITON_CONTAINER.stage_spec(stages.get(name), DIMS)
        if spec.native is None:
            with pytest.raises(ValueError, match="Python stage"):
                targets.trtexec_args(spec, "stage.onnx", "model.plan")
            continue
        args = targets.trtexec_args(spec, "stage.onnx", "model.plan")
        assert "--fp16" in args and "--saveEngine=model.plan" in args
        shapes = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "Shapes=" in a}
        for flag, batch in (("--minShapes", 1), ("--maxShapes", spec.max_batch_size)):
            for part in shapes[flag].split(","):
                tensor, dims = part.split(":")
                assert [int(d) for d in dims.split("x")] == [batch, *spec.input(tensor).dims]
        plan = stage_config(targets.plan_spec(spec))
        assert plan.platform == "tensorrt_plan" and plan.default_model_filename == "model.plan"
        assert not plan.optimization.HasField("execution_accelerators")
        assert [i.name for i in plan.input] == [t.name for t in spec.inputs]
        assert plan.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
