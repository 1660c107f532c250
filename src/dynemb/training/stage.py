"""`dynemb train --only STAGE`: fine-tune one stage of a trained model, every other weight
frozen, and write it as a swappable version directory whose manifest carries its
validation quality and its drift against the repository's serving version."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from dynemb import stages
from dynemb.checkpoint import Checkpoint
from dynemb.data.types import Dataset
from dynemb.errors import UsageError
from dynemb.evaluation.split import leave_one_out
from dynemb.manifest import Manifest, Provenance
from dynemb.paths import made_beside
from dynemb.pipeline import Pipeline
from dynemb.repository import write_version
from dynemb.stages import load_runner
from dynemb.stages.torch_stage import TorchStage
from dynemb.swap.candidates import check_out
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
    """Train `stage` of `checkpoint` further on `dataset`; write its version dir to `out`,
    a candidate as `dynemb candidate` makes one: outside the repository, over nothing but
    an earlier candidate (checked before training), made beside it and renamed into place
    (a failure or Ctrl-C leaves `out` as it was)."""
    found = stages.get(stage)
    if not isinstance(found, TorchStage):
        trainable = [name for name in stages.NAMES if stages.trainable(name)]
        raise UsageError(f"only a torch stage can be fine-tuned: {', '.join(trainable)}")
    check_out(out, repository)
    current = Pipeline.from_repository(repository) if _built(repository, stage) else None
    serving_dims = current.runners[stage].manifest.dims if current else None
    parent = Checkpoint.load(checkpoint, dims=serving_dims)
    options = dataclasses.replace(options, only=stage)
    trained = fit(dataset, leave_one_out(dataset), options, init=parent.model)
    joint = trained.model.joint
    provenance = Provenance(
        data=dataset.name,
        synthetic=dataset.synthetic,
        seed=options.seed,
        fine_tuned_from=str(checkpoint),
        only=stage,
        valid_ndcg10=trained.best_valid_ndcg10,
        parent_valid_ndcg10=parent.provenance.valid_ndcg10,
        train_seconds=round(trained.seconds, 1),
        item_labels=parent.provenance.item_labels,
    )
    with made_beside(out) as staging:  # over an earlier candidate (check_out), if any
        found.save(joint.stages[stage], staging)
        params, dims = joint.params.of(stage), joint.dims
        manifest = write_version(staging, stage, params, dims, True, provenance)
        if current is not None:
            candidate = load_runner(staging)
            probes = probe_inputs()
            new = Pipeline({**current.runners, stage: candidate}).run(
                probes, RECOMMEND, checks=False
            )
            drift = measure(current.run(probes, RECOMMEND), new, candidate)
            manifest.provenance.drift_vs_serving = drift
            manifest.save(staging)
            log.info("%s candidate drift vs serving: %s", stage, drift.as_dict())
    return manifest


def _built(repository: Path | None, stage: str) -> bool:
    return repository is not None and (repository / stage).is_dir()
