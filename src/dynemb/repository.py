"""`dynemb build`: write every stage's version directory (artifact + manifest) and the
item table into a model repository, from a trained checkpoint or seeded initial weights."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from dynemb.config import DIMS
from dynemb.data import load_dataset
from dynemb.data.types import Dataset
from dynemb.features import PreprocessAssets, Preprocessor, build_label_vocab
from dynemb.joint import JointModel
from dynemb.manifest import Manifest
from dynemb.paths import MODEL_REPOSITORY, cache_dir
from dynemb.pbtxt import write_configs
from dynemb.serving.runners import WEIGHTS
from dynemb.specs import ENSEMBLES, STAGES
from dynemb.stages.llm_encoder import minilm_path
from dynemb.stages.retrieve import ItemTable

log = logging.getLogger(__name__)
ITEM_BATCH = 256


@dataclass
class BuildOptions:
    repository: Path = MODEL_REPOSITORY
    catalogue: str = "ml-100k"  # a data set name or a JSONL path (dynemb.data.load_dataset)
    checkpoint: Path | None = None  # from `dynemb train`; None = seeded initial weights
    seed: int = 0
    cache: Path = field(default_factory=cache_dir)


class StaleCheckpointError(ValueError):
    """A checkpoint written by a dynemb whose stage networks differ from this one's."""


@dataclass
class Checkpoint:
    """What `dynemb train` saves and `dynemb build` exports.

    `FORMAT` changes whenever the stage networks change shape or meaning (2: causal MiniLM
    with a start token, item score bias, prefix-independent time features; 3: a residual
    around MiniLM's layers); a checkpoint of another format is refused with
    `StaleCheckpointError` rather than half-loaded.
    """

    FORMAT: ClassVar[int] = 3

    model: JointModel
    labels: dict[str, int]
    item_ids: list[str]  # item index i+1 <-> item_ids[i] (0 = no id)
    provenance: dict
    trained: bool

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "config": self.model.config(),
                "state": self.model.state_dict(),
                "labels": self.labels,
                "item_ids": self.item_ids,
                "provenance": self.provenance,
                "trained": self.trained,
                "format": self.FORMAT,
            },
            path,
        )

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if raw.get("format", 1) != cls.FORMAT:
            raise StaleCheckpointError(
                f"{path} has checkpoint format {raw.get('format', 1)}, this dynemb reads "
                f"format {cls.FORMAT}: retrain it with `dynemb train`"
            )
        hp = raw["config"]["hparams"]
        model = JointModel(
            DIMS,
            hp["label_mlp"]["n_labels"],
            len(raw["item_ids"]) if "item_tower.ids.weight" in raw["state"] else 0,
            hp["llm_encoder"]["bert_config"],
        )
        model.load_state_dict(raw["state"])
        return cls(model, raw["labels"], raw["item_ids"], raw["provenance"], raw["trained"])


def label_vocab(dataset: Dataset) -> dict[str, int]:
    labels = {label for item in dataset.items.values() for label in item.labels}
    labels.update(label for event in dataset.interactions for label in event.labels)
    return build_label_vocab(labels)


def initial_checkpoint(dataset: Dataset, seed: int) -> Checkpoint:
    labels = label_vocab(dataset)
    model = JointModel.initial(DIMS, len(labels), n_items=0, seed=seed)
    provenance = {"data": dataset.name, "synthetic": dataset.synthetic, "seed": seed}
    return Checkpoint(model.eval(), labels, list(dataset.items), provenance, trained=False)


def tokenizer_json() -> str:
    return (minilm_path() / "tokenizer.json").read_text(encoding="utf-8")


@torch.inference_mode()
def item_table(checkpoint: Checkpoint, dataset: Dataset, preprocessor: Preprocessor) -> ItemTable:
    """Catalogue items through the same text/image/label stages, then the item tower."""
    model = checkpoint.model.eval()
    index = {item_id: i + 1 for i, item_id in enumerate(checkpoint.item_ids)}
    items = list(dataset.items.values())
    vectors, bias = [], []
    for start in range(0, len(items), ITEM_BATCH):
        chunk = items[start : start + ITEM_BATCH]
        x = preprocessor.items(
            [i.title for i in chunk], [i.image for i in chunk], [list(i.labels) for i in chunk]
        )
        content = model.item_content({k: torch.from_numpy(v) for k, v in x.items()})
        ids = torch.tensor([index.get(i.item_id, 0) for i in chunk])
        vectors.append(model.item_tower(content, ids).numpy())
        bias.append(model.item_tower.item_bias(ids).numpy())
    return ItemTable(
        [i.item_id for i in items],
        [i.title for i in items],
        np.concatenate(vectors),
        np.concatenate(bias).astype(np.float32),
    )


def prepare_version_dir(repository: Path, stage: str, version: int = 1) -> Path:
    """An empty version directory holding only the stage's adapter (`model.py`); every
    other version (and a swap's leftover staging directory) is removed."""
    model_dir = repository / stage
    target = model_dir / str(version)
    for old in model_dir.glob("[0-9]*"):
        if old.is_dir() and old != target:
            shutil.rmtree(old)
    template = MODEL_REPOSITORY / stage / "1" / "model.py"
    if target.exists():
        for path in target.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            elif path.name != "model.py":
                path.unlink()
    target.mkdir(parents=True, exist_ok=True)
    if template.resolve() != (target / "model.py").resolve():
        shutil.copy2(template, target / "model.py")
    return target


def build_repository(
    options: BuildOptions, progress: Callable[[Iterable[str]], Iterable[str]] = iter
) -> dict[str, Manifest]:
    """Write configs and version 1 of every stage; return the manifests written."""
    dataset = load_dataset(options.catalogue, options.cache)
    checkpoint = (
        Checkpoint.load(options.checkpoint)
        if options.checkpoint
        else initial_checkpoint(dataset, options.seed)
    )
    write_configs(options.repository)
    for ensemble in ENSEMBLES:  # ensembles hold no version files, only an empty dir
        (options.repository / ensemble / "1").mkdir(parents=True, exist_ok=True)
    assets = PreprocessAssets(DIMS, checkpoint.labels, tokenizer_json())
    provenance = dict(checkpoint.provenance, catalogue=dataset.name)
    manifests = {}
    for stage in progress(list(STAGES)):
        target = prepare_version_dir(options.repository, stage)
        manifest = Manifest(
            stage=stage,
            signature=STAGES[stage].signature,
            dims=checkpoint.model.config()["dims"],
            trained=checkpoint.trained,
            provenance=provenance,
        )
        if stage == "preprocess":
            assets.save(target)
            manifest.hparams = {"n_labels": len(assets.labels)}
        elif stage == "retrieve":
            item_table(checkpoint, dataset, Preprocessor(assets)).save(target)
            manifest.hparams = {"n_items": len(dataset.items)}
        else:
            torch.save(checkpoint.model.stages[stage].state_dict(), target / WEIGHTS)
            manifest.hparams = checkpoint.model.hparams[stage]
        manifest.save(target)
        manifests[stage] = manifest
        log.info("wrote %s", target)
    return manifests
