"""What `dynemb train` saves and `dynemb build` exports: the joint model with its dims and
typed hyperparameters, the label vocabulary, the item ids and where it all comes from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from dynemb.data.types import Dataset
from dynemb.dims import Dims
from dynemb.errors import DynembError
from dynemb.joint import JointModel, JointParams
from dynemb.manifest import Provenance
from dynemb.stages.llm_encoder import MINILM_LAYERS, minilm_config
from dynemb.stages.preprocess.features import build_label_vocab


class CheckpointError(DynembError, ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or not what was expected."""


class StaleCheckpointError(CheckpointError):
    """A checkpoint written by a dynemb whose stage networks differ from this one's."""


def check_checkpoint_path(path: Path) -> None:
    """A checkpoint can be written at `path`: not a folder, and under a folder (or where
    one can be made), so a training run does not find out after its 25 minutes."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; a checkpoint is a file (e.g. {path}/model.pt)")
    for parent in (path.parent, *path.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointError(f"{path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CheckpointError(f"{path}: {parent} is not writable")
            return


@dataclass
class Checkpoint:
    """The model and everything its export needs. Its dims are the ones it was trained
    with: `load` rebuilds exactly those, and refuses weights that do not fit them.

    `FORMAT` changes whenever the stage networks change shape or meaning (2: causal MiniLM
    with a start token, item score bias, prefix-independent time features; 3: a residual
    around MiniLM's layers; 4: the item tower reads title sentence embeddings and predicts
    a content prior bias); a checkpoint of another format is refused with
    `StaleCheckpointError` rather than half-loaded.
    """

    FORMAT: ClassVar[int] = 4

    model: JointModel
    labels: dict[str, int]
    item_ids: list[str]  # item index i+1 <-> item_ids[i] (0 = no id)
    provenance: Provenance
    trained: bool

    @property
    def dims(self) -> Dims:
        return self.model.dims

    def save(self, path: Path) -> None:
        check_checkpoint_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")  # never a half-written checkpoint
        try:
            self._write(partial)
        except BaseException:  # a full disk, Ctrl-C: nothing half-written stays behind
            partial.unlink(missing_ok=True)
            raise
        partial.replace(path)

    def _write(self, path: Path) -> None:
        torch.save(
            {
                "config": {
                    "dims": self.dims.to_json(),
                    "hparams": self.model.params.to_json(),
                    "n_items": self.model.n_items,
                },
                "state": self.model.state_dict(),
                "labels": self.labels,
                "item_ids": self.item_ids,
                "provenance": self.provenance.to_json(),
                "trained": self.trained,
                "format": self.FORMAT,
            },
            path,
        )

    @classmethod
    def load(cls, path: Path, dims: Dims | None = None) -> Checkpoint:
        """Load `path`; with `dims`, refuse a checkpoint trained with other dims."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint at {path}: train one with `dynemb train`")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which, not a pickle trace
            raise CheckpointError(f"{path} is not a readable checkpoint ({exc})") from exc
        if raw.get("format", 1) != cls.FORMAT:
            raise StaleCheckpointError(
                f"{path} has checkpoint format {raw.get('format', 1)}, this dynemb reads "
                f"format {cls.FORMAT}: retrain it with `dynemb train`"
            )
        config = raw["config"]
        saved = Dims.from_json(config["dims"])
        if dims is not None and saved != dims:
            raise CheckpointError(
                f"{path} was trained with other dims ({'; '.join(saved.differences(dims))})"
            )
        # Checkpoints before n_items was recorded: an id table means one row per item.
        n_items = config.get(
            "n_items", len(raw["item_ids"]) if "item_tower.ids.weight" in raw["state"] else 0
        )
        model = JointModel(saved, JointParams.from_json(config["hparams"]), n_items)
        try:
            model.load_state_dict(raw["state"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: weights do not fit its own config ({exc})") from exc
        return cls(
            model.eval(),
            raw["labels"],
            raw["item_ids"],
            Provenance.from_json(raw["provenance"]),
            raw["trained"],
        )


def label_vocab(dataset: Dataset) -> dict[str, int]:
    """Every label of the catalogue's items and of the interactions."""
    labels = {label for item in dataset.items.values() for label in item.labels}
    labels.update(label for event in dataset.interactions for label in event.labels)
    return build_label_vocab(labels)


def initial_checkpoint(
    dataset: Dataset,
    dims: Dims,
    seed: int,
    llm_layers: int = MINILM_LAYERS,
    pretrained: bool = True,
) -> Checkpoint:
    """Seeded, untrained weights for a repository without training: MiniLM's first
    `llm_layers` layers (by default as many as training keeps: an untrained repository
    costs what a trained one does), pretrained unless `pretrained` is False (seeded weights
    of the same shapes, where MiniLM's weights are not installed: the GPU benchmark's
    machine; what a request costs does not depend on the weights)."""
    labels = label_vocab(dataset)
    params = JointParams.default(len(labels), bert_config=minilm_config(layers=llm_layers))
    model = JointModel.initial(dims, params, n_items=0, seed=seed, pretrained=pretrained)
    note = "" if pretrained else "seeded weights, MiniLM not pretrained (same shapes)"
    provenance = Provenance(data=dataset.name, synthetic=dataset.synthetic, seed=seed, note=note)
    return Checkpoint(model.eval(), labels, list(dataset.items), provenance, trained=False)
