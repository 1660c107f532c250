"""The committed config.pbtxt files are exactly what the typed specs generate."""

from __future__ import annotations

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dynemb.paths import MODEL_REPOSITORY
from dynemb.pbtxt import all_configs
from dynemb.specs import ENSEMBLES, STAGES


def test_committed_configs_match_specs():
    generated = all_configs()
    for name, text in generated.items():
        path = MODEL_REPOSITORY / name / "config.pbtxt"
        assert path.exists(), f"{path} missing: run `dynemb configs`"
        assert path.read_text(encoding="utf-8") == text, f"{path} drifted: run `dynemb configs`"
    on_disk = {p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt")}
    assert on_disk == set(generated), "a model folder has no spec (or a spec no folder)"


def test_configs_parse_and_say_batch_size_and_batching():
    for name, text in all_configs().items():
        config = text_format.Parse(text, mc.ModelConfig())
        assert config.name == name
        assert "max_batch_size: 32" in text
        if name in STAGES:
            assert config.HasField("dynamic_batching")
            assert config.backend == "python"
            assert config.instance_group[0].count == STAGES[name].instances


def test_ensemble_steps_are_fed_by_earlier_steps_or_ensemble_inputs():
    for ensemble in ENSEMBLES.values():
        available = {t.name for t in ensemble.inputs}
        for step in ensemble.steps:
            stage = STAGES[step]
            missing = {t.name for t in stage.inputs} - available
            assert not missing, f"{ensemble.name}/{step} needs {missing}"
            available |= {t.name for t in stage.outputs}
        assert {t.name for t in ensemble.outputs} <= available


def test_stage_tensors_have_consistent_shapes_across_steps():
    produced = {}
    for stage in STAGES.values():
        for tensor in stage.outputs:
            produced[tensor.name] = tensor
    for stage in STAGES.values():
        for tensor in stage.inputs:
            if tensor.name in produced:
                assert produced[tensor.name] == tensor, f"{stage.name}.{tensor.name} mismatch"
