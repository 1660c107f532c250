"""Build TensorRT plans from a triton-container repository's `stage.onnx` files, inside
NVIDIA's container (README.md beside this file). NOT RUN in this project yet: no GPU or
container was available where it was written.

    python3 build/triton-container/build_engines.py --repository /models --out /engines

For each neural stage it runs trtexec with the shapes and precision of the variant's own
TensorRT profile (dynemb.targets.trtexec_args), and writes into OUT a model folder that
serves the plan natively: `<stage>/config.pbtxt` (platform tensorrt_plan, generated from
the same spec), `<stage>/1/model.plan` and `<stage>/1/engine.json` (GPU, driver, TensorRT
version, the exact flags, the ONNX's and the plan's sha256, build seconds). A plan runs
only on the GPU model and TensorRT version it was built with: engines are build outputs,
never committed. Swap a model folder of the repository for OUT's to serve the plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import time
from pathlib import Path

from dynemb import stages
from dynemb.configs import render, stage_config
from dynemb.manifest import Manifest, sha256
from dynemb.pipeline import latest_version
from dynemb.stages.torch_stage import STAGE_ONNX
from dynemb.targets import TRITON_CONTAINER, plan_spec, trtexec_args


def trtexec() -> str:
    for candidate in ("trtexec", "/usr/src/tensorrt/bin/trtexec"):
        found = shutil.which(candidate)
        if found:
            return found
    raise SystemExit(
        "no trtexec in this image: run inside nvcr.io/nvidia/tensorrt:24.10-py3 (TensorRT "
        "10.5, as tritonserver:24.10-py3) with the repository and OUT mounted"
    )


def query(field: str) -> str:
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


def tensorrt_version(log: str) -> str:
    for line in log.splitlines():
        if "TensorRT version" in line:
            return line.split("TensorRT version", 1)[1].strip(" :")
    return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    binary = trtexec()
    for name in stages.NAMES:
        stage = stages.get(name)
        if not stage.neural:
            continue
        directory = latest_version(args.repository / name)
        spec = TRITON_CONTAINER.stage_spec(stage, Manifest.load(directory).dims)
        target = args.out / name / "1"
        target.mkdir(parents=True, exist_ok=True)
        plan = target / "model.plan"
        flags = trtexec_args(spec, str(directory / STAGE_ONNX), str(plan))
        started = time.monotonic()
        run = subprocess.run([binary, *flags], capture_output=True, text=True, check=False)
        (target / "trtexec.log").write_text(run.stdout + run.stderr, encoding="utf-8")
        if run.returncode != 0:
            raise SystemExit(f"{name}: trtexec failed, see {target / 'trtexec.log'}")
        (args.out / name / "config.pbtxt").write_text(render(stage_config(plan_spec(spec))))
        engine = {
            "stage": name,
            "gpu": query("name"),
            "driver": query("driver_version"),
            "tensorrt": tensorrt_version(run.stdout),
            "flags": flags,
            "onnx_sha256": sha256(directory / STAGE_ONNX),
            "plan_sha256": sha256(plan),
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (target / "engine.json").write_text(json.dumps(engine, indent=1) + "\n")
        print(f"{name}: {plan} in {engine['build_seconds']} s ({engine['gpu']})")


if __name__ == "__main__":
    main()
