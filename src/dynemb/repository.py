"""`dynemb build`: write every stage's version directory (artifact + manifest) into a model
repository, from a trained checkpoint or from seeded initial weights, with the configs of
a build target (dynemb.targets: cpu, gpu, triton-container; the artifacts are the same for
all). Each stage writes its own artifact (`Stage.export`); this module only orders the
work and writes manifests."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dynemb import stages
from dynemb.checkpoint import Checkpoint, initial_checkpoint
from dynemb.configs import adapter_source, write_configs
from dynemb.data import load_dataset
from dynemb.dims import DIMS, Dims
from dynemb.manifest import ADAPTER, Manifest, Provenance
from dynemb.paths import MODEL_REPOSITORY, UNFINISHED_BUILD, cache_dir
from dynemb.stages.base import ExportContext
from dynemb.stages.llm_encoder import MINILM_LAYERS
from dynemb.targets import CPU, Target

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    repository: Path = MODEL_REPOSITORY
    catalogue: str = "ml-100k"  # a data set name or a JSONL path (dynemb.data.load_dataset)
    checkpoint: Path | None = None  # from `dynemb train`; None = seeded initial weights
    seed: int = 0
    dims: Dims = DIMS  # of seeded weights; a checkpoint brings its own
    cache: Path = field(default_factory=cache_dir)
    target: Target = CPU  # whose configs the repository gets
    # Seeded weights only: MiniLM layers kept (as many as training keeps: the same cost),
    # and whether they are MiniLM's pretrained ones (False: seeded, where its weights are
    # not installed).
    llm_layers: int = MINILM_LAYERS
    pretrained: bool = True


def prepare_version_dir(repository: Path, stage: str, version: int = 1) -> Path:
    """An empty version directory holding only the stage's adapter (`model.py`); every
    other version (and a swap's leftover staging directory) is removed."""
    model_dir = repository / stage
    target = model_dir / str(version)
    for old in model_dir.glob("[0-9]*"):
        if old.is_dir() and old != target:
            shutil.rmtree(old)
    if target.exists():
        for path in target.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != ADAPTER:
                path.unlink()
    target.mkdir(parents=True, exist_ok=True)
    (target / ADAPTER).write_text(adapter_source(stage), encoding="utf-8")
    return target


def write_version(
    directory: Path,
    stage: str,
    hparams: object,
    dims: Dims,
    trained: bool,
    provenance: Provenance,
) -> Manifest:
    """The manifest of a version directory whose artifact is already written."""
    manifest = Manifest(
        stage=stage,
        signature=stages.get(stage).spec(dims).signature,
        dims=dims,
        hparams=hparams,
        trained=trained,
        provenance=provenance,
    )
    manifest.save(directory)
    return manifest


def build_repository(
    options: BuildOptions, progress: Callable[[Iterable[str]], Iterable[str]] = iter
) -> dict[str, Manifest]:
    """Write configs, adapters and version 1 of every stage; return the manifests written."""
    dataset = load_dataset(options.catalogue, options.cache)
    checkpoint = (
        Checkpoint.load(options.checkpoint)
        if options.checkpoint
        else initial_checkpoint(
            dataset, options.dims, options.seed, options.llm_layers, options.pretrained
        )
    )
    options.repository.mkdir(parents=True, exist_ok=True)
    marker = options.repository / UNFINISHED_BUILD  # until every stage is written
    marker.write_text(f"dynemb build into {options.repository} started\n", encoding="utf-8")
    write_configs(options.repository, checkpoint.dims, options.target)
    context = ExportContext(checkpoint, dataset)
    manifests = {}
    for name in progress(list(stages.NAMES)):
        stage = stages.get(name)
        target = prepare_version_dir(options.repository, name)
        hparams = stage.export(context, target)
        trained = checkpoint.trained and stage.learned
        provenance = dataclasses.replace(checkpoint.provenance, catalogue=dataset.name)
        manifests[name] = write_version(target, name, hparams, checkpoint.dims, trained, provenance)
        log.info("wrote %s", target)
    marker.unlink()
    return manifests
