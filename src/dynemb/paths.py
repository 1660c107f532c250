"""Where things live: resolved from the working directory, never from where the package is
installed, so that a plain `pip install .` runs the same commands as a checkout.

Every command takes the model repository as an explicit `--repository`; its default is
`model_repository/` in the working directory (the checkout's own when run from its root).
Data, checkpoints, the server tree and logs go to `DYNEMB_CACHE`, by default
`.cache/dynemb/` in the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

# Relative on purpose: resolved against the working directory when used.
MODEL_REPOSITORY = Path("model_repository")
RESULTS_DIR = Path("benchmarks") / "results"
CACHE_ENV = "DYNEMB_CACHE"


def cache_dir() -> Path:
    """Data, checkpoints and the server tree; `DYNEMB_CACHE` overrides."""
    path = Path(os.environ.get(CACHE_ENV) or Path.cwd() / ".cache" / "dynemb")
    path.mkdir(parents=True, exist_ok=True)
    return path
