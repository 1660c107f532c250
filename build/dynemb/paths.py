"""Where things live: the checkout's model repository and the (git-ignored) cache."""

from __future__ import annotations

import os
from pathlib import Path

# build/dynemb/paths.py -> the repository root (the package is installed editable).
ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = ROOT / "model_repository"


def cache_dir() -> Path:
    """Data, checkpoints and the server tree; `DYNEMB_CACHE` overrides."""
    path = Path(os.environ.get("DYNEMB_CACHE", ROOT / ".cache" / "dynemb"))
    path.mkdir(parents=True, exist_ok=True)
    return path
