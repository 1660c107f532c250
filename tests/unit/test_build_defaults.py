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


def test_a_catalogue_image_that_does_not_decode_names_its_item(tmp_path):
    """It was a traceback naming EVENT_IMAGE[1], a row of a batch of the item table."""
    import io

    import pytest
    from PIL import Image

    from dynemb.errors import UsageError
    from dynemb.repository import BuildOptions, build_repository

    encoded = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(encoded, "JPEG")
    (tmp_path / "ok.jpg").write_bytes(encoded.getvalue())
    (tmp_path / "cut.jpg").write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    catalogue = tmp_path / "catalogue.jsonl"
    lines = [
        {"user": "u", "time": 1_700_000_000, "text": "fine", "image": "ok.jpg", "item": "p1"},
        {"user": "u", "time": 1_700_000_001, "text": "cut", "image": "cut.jpg", "item": "p2"},
    ]
    catalogue.write_text("\n".join(map(json.dumps, lines)) + "\n")
    options = BuildOptions(repository=tmp_path / "repository", catalogue=str(catalogue))
    with pytest.raises(UsageError, match=r"^catalogue item 'p2' \('cut'\): could not be decoded"):
        build_repository(options)
