"""What `dynemb build` gives without a checkpoint."""

from __future__ import annotations

import json

from dynemb.training.train import TrainOptions


def test_a_repository_built_without_training_has_the_trained_model_s_shape(repo):
    """Seeded weights keep as many MiniLM layers as training does, so that what an
    untrained repository costs (a load test, a quick try) is what a trained one costs.
    The documented Locust run on such a build served 110 requests/s with all six layers
    (llm_encoder 78 ms a batch of 3.1 users) and 247 with two (23 ms a batch of 2.7)."""
    manifest = json.loads((repo / "llm_encoder" / "1" / "manifest.json").read_text())
    layers = manifest["hparams"]["bert_config"]["num_hidden_layers"]
    assert layers == TrainOptions().llm_layers == 2


def test_a_catalogue_without_labels_builds(tmp_path):
    """Labels are optional in a catalogue: one with none made a vocabulary of PAD and UNK
    only, and label_mlp's ONNX export traced label id 2 (an IndexError traceback)."""
    from dynemb.pipeline import Pipeline
    from dynemb.repository import BuildOptions, build_repository
    from dynemb_client import Event, build_inputs

    catalogue = tmp_path / "catalogue.jsonl"
    lines = [{"user": "u", "time": 1_700_000_000 + i, "text": f"lamp {i}"} for i in range(3)]
    catalogue.write_text("\n".join(map(json.dumps, lines)) + "\n")
    repository = tmp_path / "repository"
    build_repository(BuildOptions(repository=repository, catalogue=str(catalogue)))
    pipeline = Pipeline.from_repository(repository)
    x = build_inputs([[Event(1_700_000_000, "lamp 1", labels=["brand:new"])]], [None], 50, 8)
    assert pipeline.embed(x).shape[0] == 1
