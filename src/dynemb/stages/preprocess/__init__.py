"""preprocess: raw events -> tokens, pixels, label ids, time and window features.

Its artifact is the tokenizer and the label vocabulary (`PreprocessAssets`, in
`features.py` with the feature code); it has no learned weights. Its process imports no
torch: `features.py` is numpy, tokenizers and Pillow only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dynemb.serving.cache import RowCache
from dynemb.specs import StageSpec, TensorSpec
from dynemb.stages.base import CandidateChange, ExportContext, Runner, RunnerOptions, Stage
from dynemb.tensors import Tensors

if TYPE_CHECKING:
    from dynemb.checkpoint import Checkpoint
    from dynemb.manifest import Manifest
    from dynemb.stages.preprocess.features import PreprocessAssets


@dataclass(frozen=True)
class PreprocessParams:
    n_labels: int  # size of the label vocabulary it maps labels into


class PreprocessRunner(Runner):
    def __init__(
        self, spec: StageSpec, manifest: Manifest, directory: Path, options: RunnerOptions
    ) -> None:
        from dynemb.stages.preprocess.features import (
            PreprocessAssets,
            PreprocessCaches,
            Preprocessor,
        )

        super().__init__(spec, manifest)
        caches = PreprocessCaches.bounded(options.cache_entries, options.cache_mb)
        self.preprocessor = Preprocessor(PreprocessAssets.load(directory), caches)

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.preprocessor(inputs)

    def caches(self) -> dict[str, RowCache]:
        return self.preprocessor.caches.by_name()


def assets_for(checkpoint: Checkpoint) -> PreprocessAssets:
    """What a checkpoint's preprocess version holds: its dims, its label vocabulary and
    MiniLM's tokenizer."""
    from dynemb.stages.llm_encoder import tokenizer_json
    from dynemb.stages.preprocess.features import PreprocessAssets

    return PreprocessAssets(checkpoint.dims, checkpoint.labels, tokenizer_json())


class PreprocessStage(Stage):
    name = "preprocess"
    description = "tokenise, decode images, map labels, time and window features"
    params_type = PreprocessParams
    learned = False
    # perturb: retuned trailing windows (same shapes, other features); broken: a label
    # vocabulary that is not one, so initialize raises.
    candidate_kinds = ("perturb", "broken", "signature")
    # Texts' tokens (~0.5 kB), labels (~0.7 kB) and images' pixels (~3.3 kB) by content.
    options = RunnerOptions(cache_entries=100_000, cache_mb=96)

    def tensors(self, t: Tensors) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        inputs = (t.event_text, t.event_image, t.event_labels, t.event_time, t.event_count)
        outputs = (t.token_ids, t.token_count, t.image_pixels, t.image_mask, t.label_ids)
        return (*inputs, t.query_time), (*outputs, t.time_features, t.query_features, t.event_mask)

    def export(self, context: ExportContext, directory: Path) -> PreprocessParams:
        assets = assets_for(context.checkpoint)
        assets.save(directory)
        return PreprocessParams(len(assets.labels))

    def runner(self, directory: Path, manifest: Manifest, options: RunnerOptions) -> Runner:
        return PreprocessRunner(self.spec(manifest.dims), manifest, directory, options)

    def change(self, directory: Path, manifest: Manifest, change: CandidateChange) -> None:
        from dynemb.stages.preprocess.features import PreprocessAssets

        assets = PreprocessAssets.load(directory)
        factor = 1.0 + 10 * change.scale
        windows = tuple(int(w * factor) for w in assets.dims.windows_s)
        dims = dataclasses.replace(assets.dims, windows_s=windows)
        labels = "not a vocabulary" if change.kind == "broken" else assets.labels
        PreprocessAssets(dims, labels, assets.tokenizer_json).save(directory)
        manifest.dims = dims


STAGE = PreprocessStage()
