"""perf_analyzer as the cross-check of the served numbers: NVIDIA's own load generator
(shipped in the tritonclient wheel) on the same server, the same users, one user per
request, closed loop at each concurrency; and Triton's per-stage (composing model)
breakdown of where a request's time goes.

perf_analyzer needs libb64.so.0d and libcudart.so.12. nvidia-pytriton ships both, under
auditwheel's hashed names (libb64-<hash>.so.0d), so they are linked under their plain
names into a folder of the cache that goes first on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dynemb.bench.histories import HistorySet
from dynemb.dims import Dims
from dynemb_client import build_inputs

NEEDED = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


class PerfAnalyzerError(RuntimeError):
    pass


def perf_analyzer_binary() -> Path:
    found = Path(sys.executable).parent / "perf_analyzer"
    if not found.exists():
        which = shutil.which("perf_analyzer")
        if which is None:
            raise PerfAnalyzerError("perf_analyzer not found (it comes with tritonclient 2.51)")
        found = Path(which)
    return found


def library_dir(cache: Path) -> Path:
    """A folder holding perf_analyzer's two libraries under the names it asks for."""
    import pytriton

    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    target = cache / "perf_analyzer_libs"
    target.mkdir(parents=True, exist_ok=True)
    for name, pattern in NEEDED.items():
        matches = sorted(libs.glob(pattern))
        if not matches:
            raise PerfAnalyzerError(f"{libs} has no {pattern} for perf_analyzer's {name}")
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(matches[0])
    return target


def input_data(histories: HistorySet, dims: Dims, path: Path, max_users: int | None = None) -> Path:
    """perf_analyzer's --input-data JSON: one entry per user (every user, unless
    `max_users`), the wire tensors the client would send, so that both load generators
    send the same requests. Its JSON takes a BYTES tensor's elements as text (one base64
    blob is one element), so users with encoded images cannot be written and are left out."""
    rows = []
    for user, at in zip(histories.users, histories.at, strict=True):
        if any(e.image for e in user):
            continue
        x = build_inputs([user], [at], dims.max_events, dims.max_labels)
        row = {}
        for name, value in x.items():
            value = value[0]
            content = (
                [b.decode("utf-8") for b in value.reshape(-1)]
                if value.dtype == object
                else value.reshape(-1).tolist()
            )
            row[name] = {"content": content, "shape": list(value.shape)}
        rows.append(row)
        if max_users is not None and len(rows) >= max_users:
            break
    if not rows:
        raise PerfAnalyzerError(f"{histories.name}: every user has images; perf_analyzer skipped")
    path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    return path


@dataclass
class StageBreakdown:
    """Triton's account of one composing model, per request (microseconds)."""

    inferences: int
    executions: int
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float


@dataclass
class PerfPoint:
    concurrency: int
    users_per_s: float
    p50_ms: float
    p99_ms: float
    stages: dict[str, StageBreakdown] = field(default_factory=dict)
    error: str | None = None  # perf_analyzer gave no stable measurement


def run(
    binary: Path,
    libs: Path,
    url: str,
    model: str,
    data: Path,
    concurrency: int,
    window_ms: int,
    stability_percent: int = 25,
) -> PerfPoint:
    """One perf_analyzer measurement: it repeats windows until throughput and latency are
    stable within `stability_percent` (its default 10% rarely settles on two shared cores)."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(libs), env.get("LD_LIBRARY_PATH")) if p
    )
    command = [
        str(binary),
        "-m",
        model,
        "-i",
        "grpc",
        "-u",
        url,
        "--input-data",
        str(data),
        "--concurrency-range",
        str(concurrency),
        "--measurement-interval",
        str(window_ms),
        "--percentile",
        "99",
        "--stability-percentage",
        str(stability_percent),
        "--max-trials",
        "10",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-3000:]
        raise PerfAnalyzerError(f"perf_analyzer failed ({done.returncode}):\n{output}")
    return parse(done.stdout, concurrency)


def parse(text: str, concurrency: int) -> PerfPoint:
    """Throughput, p50 and p99 (client side) and the composing models' breakdown."""

    def number(pattern: str, where: str = text) -> float:
        found = re.search(pattern, where)
        if found is None:
            raise PerfAnalyzerError(f"no {pattern!r} in perf_analyzer's output")
        return float(found.group(1))

    point = PerfPoint(
        concurrency=concurrency,
        users_per_s=number(r"Throughput: ([\d.]+) infer/sec"),
        p50_ms=number(r"p50 latency: (\d+) usec") / 1000,
        p99_ms=number(r"p99 latency: (\d+) usec") / 1000,
    )
    _, _, composing = text.partition("Composing models:")
    for block in re.split(r"\n\s*\n", composing):
        head = re.search(r"^\s*(\w+), version: \d+", block, re.M)
        if head is None or "Inference count" not in block:
            continue
        point.stages[head.group(1)] = StageBreakdown(
            inferences=int(number(r"Inference count: (\d+)", block)),
            executions=int(number(r"Execution count: (\d+)", block)),
            queue_us=number(r"queue (\d+) usec", block),
            compute_input_us=number(r"compute input (\d+) usec", block),
            compute_infer_us=number(r"compute infer (\d+) usec", block),
            compute_output_us=number(r"compute output (\d+) usec", block),
        )
    return point
