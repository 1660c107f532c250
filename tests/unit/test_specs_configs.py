"""The committed config.pbtxt and model.py files are exactly what the stage specs generate."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from dynemb import stages
from dynemb.configs import adapters, all_configs, write_configs
from dynemb.dims import DIMS
from dynemb.ensembles import ENSEMBLE_SPECS, STAGE_SPECS

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
