"""`dynemb train --only STAGE`: fine-tune one stage of a trained model, every other weight
frozen, and write it as a swappable version directory whose manifest carries its
validation quality and its drift against the repository's serving version."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from dynemb.data.types import Dataset
from dynemb.evaluation.split import leave_one_out
from dynemb.manifest import Manifest
from dynemb.pipeline import Pipeline
from dynemb.repository import Checkpoint
from dynemb.serving.runners import WEIGHTS, load_runner
from dynemb.specs import STAGES
from dynemb.stages import TORCH_STAGES
from dynemb.swap.drift import measure, probe_inputs
from dynemb.training.train import TrainOptions, fit
from dynemb_client.contract import RECOMMEND

log = logging.getLogger(__name__)


def fine_tune_stage(
    dataset: Dataset,
    checkpoint: Path,
    stage: str,
    out: Path,
    options: TrainOptions,
    repository: Path | None = None,
) -> Manifest:
    """Train `stage` of `checkpoint` further on `dataset`; write its version dir to `out`."""
    if stage not in TORCH_STAGES:
        raise ValueError(f"only a torch stage can be fine-tuned: {', '.join(TORCH_STAGES)}")
    parent = Checkpoint.load(checkpoint)
    options = dataclasses.replace(options, only=stage)
    trained = fit(dataset, leave_one_out(dataset), options, init=parent.model)
    joint = trained.model.joint
    out.mkdir(parents=True, exist_ok=True)
    torch.save(joint.stages[stage].state_dict(), out / WEIGHTS)
    manifest = Manifest(
        stage=stage,
        signature=STAGES[stage].signature,
        dims=joint.config()["dims"],
        hparams=joint.hparams[stage],
        trained=True,
        provenance={
            "data": dataset.name,
            "synthetic": dataset.synthetic,
            "seed": options.seed,
            "fine_tuned_from": str(checkpoint),
            "only": stage,
            "valid_ndcg10": trained.best_valid_ndcg10,
            "parent_valid_ndcg10": parent.provenance.get("valid_ndcg10"),
            "train_seconds": round(trained.seconds, 1),
        },
    )
    manifest.save(out)
    if repository is not None and (repository / stage).exists():
        current = Pipeline.from_repository(repository)
        candidate = load_runner(out)
        probes = probe_inputs()
        new = Pipeline({**current.runners, stage: candidate}).run(probes, RECOMMEND)
        drift = measure(current.run(probes, RECOMMEND), new, candidate)
        manifest.provenance["drift_vs_serving"] = drift.as_dict()
        manifest.save(out)
        log.info("%s candidate drift vs serving: %s", stage, drift.as_dict())
    return manifest
