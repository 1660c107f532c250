"""The manifest that makes a stage's version directory self-describing."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dynemb import __version__
from dynemb.config import Dims

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    stage: str
    signature: dict  # StageSpec.signature: checked on load and on swap
    dims: dict
    hparams: dict = field(default_factory=dict)  # constructor arguments beyond dims
    trained: bool = False
    provenance: dict = field(default_factory=dict)  # data, seed, metrics, parent version
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    created: str = ""
    dynemb_version: str = __version__
    git_commit: str = ""

    def dims_obj(self) -> Dims:
        values = dict(self.dims)
        values["windows_s"] = tuple(values["windows_s"])
        return Dims(**values)

    def save(self, directory: Path) -> Path:
        self.files = {
            p.name: sha256(p)
            for p in sorted(directory.iterdir())
            if p.is_file() and p.name not in (MANIFEST, "model.py")
        }
        self.created = self.created or dt.datetime.now(dt.timezone.utc).isoformat(
            timespec="seconds"
        )
        self.git_commit = self.git_commit or git_commit()
        path = directory / MANIFEST
        path.write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        return cls(**json.loads((directory / MANIFEST).read_text(encoding="utf-8")))

    def verify(self, directory: Path) -> None:
        """Refuse a version directory whose artifacts are not the ones the manifest names."""
        for name, digest in self.files.items():
            path = directory / name
            if not path.exists():
                raise FileNotFoundError(f"{path}: listed in the manifest but missing")
            if sha256(path) != digest:
                raise ValueError(f"{path}: sha256 differs from the manifest")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(dirty_flag: bool = False) -> str:
    """The checkout's commit, "unknown" outside git; with `dirty_flag`, says whether the
    working tree differs from it (results should name the code that produced them)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = (
            dirty_flag
            and subprocess.run(
                ["git", "status", "--porcelain"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + (" (working tree has uncommitted changes)" if dirty else "")
