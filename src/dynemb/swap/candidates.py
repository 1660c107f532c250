"""Compatible (and deliberately broken) candidate versions of one stage.

Until `dynemb train --only STAGE` exists, a perturbed or re-initialised copy of the serving
version is the candidate operators and tests swap in. The broken kinds exist so the guards
can be shown to refuse them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dynemb.manifest import Manifest
from dynemb.pipeline import latest_version
from dynemb.serving.runners import WEIGHTS

KINDS = ("perturb", "reinit", "nan", "broken", "signature")


def make_candidate(
    repository: Path,
    stage: str,
    out: Path,
    kind: str = "perturb",
    scale: float = 0.01,
    seed: int = 0,
) -> Path:
    """Copy the serving version of `stage` to `out` and change it as `kind` says:
    perturb (relative Gaussian noise), reinit (fresh seeded weights), nan (a NaN weight),
    broken (weights that do not fit: initialize raises), signature (a changed dimension)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    source = latest_version(repository / stage)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns("model.py", "__pycache__"))
    manifest = Manifest.load(out)
    rng = np.random.default_rng(seed)
    if kind == "signature":
        dims = asdict(manifest.dims_obj())
        manifest.signature = json.loads(json.dumps(manifest.signature))
        manifest.signature["outputs"][0][2][-1] += 1  # one more output channel
        manifest.dims = dims
    elif (out / WEIGHTS).exists():
        _change_weights(out / WEIGHTS, manifest, kind, scale, seed)
    elif stage == "retrieve":
        table = np.load(out / "item_table.npy")
        table = table + scale * rng.standard_normal(table.shape).astype(np.float32)
        if kind == "nan":
            table[0, 0] = np.nan
        np.save(out / "item_table.npy", table / np.linalg.norm(table, axis=1, keepdims=True))
    elif stage == "preprocess":
        assets = json.loads((out / "assets.json").read_text(encoding="utf-8"))
        factor = 1.0 + 10 * scale  # retuned trailing windows: same shapes, other features
        assets["dims"]["windows_s"] = [int(w * factor) for w in assets["dims"]["windows_s"]]
        if kind == "broken":
            assets["labels"] = "not a vocabulary"
        (out / "assets.json").write_text(
            json.dumps(assets, indent=1, sort_keys=True), encoding="utf-8"
        )
        manifest.dims = assets["dims"]
    manifest.provenance = {**manifest.provenance, "candidate": kind, "scale": scale, "seed": seed}
    manifest.save(out)
    return out


def _change_weights(path: Path, manifest: Manifest, kind: str, scale: float, seed: int) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    if kind == "reinit":
        from dynemb.stages import TORCH_STAGES

        torch.manual_seed(seed)
        fresh = TORCH_STAGES[manifest.stage]()(manifest.dims_obj(), **manifest.hparams)
        state = fresh.state_dict()
    elif kind == "broken":
        name = next(k for k, v in state.items() if v.dtype.is_floating_point)
        state[name] = torch.zeros(3, 3)  # wrong shape: load_state_dict raises on load
    else:
        for name, value in state.items():
            if value.dtype.is_floating_point and value.numel() > 1:
                noise = torch.randn(value.shape, generator=generator) * value.std()
                state[name] = value + scale * noise
        if kind == "nan":  # the output layer's bias: every output becomes NaN
            name = [k for k, v in state.items() if v.dtype.is_floating_point][-1]
            state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, path)
