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
