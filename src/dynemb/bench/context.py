"""What every benchmark result records next to its numbers, and the helpers to read it.

A latency figure means little without the machine it ran on, how busy that machine was,
the code version and the batching settings that produced it. `collect_context` gathers all
of that once, at the start of a run, so the load average describes the machine before the
benchmark itself loaded it. `stage_stats` turns two snapshots of Triton's statistics into
what dynamic batching achieved per model (average batch size = inferences / executions).
"""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from dynemb.ensembles import ENSEMBLE_SPECS, STAGE_SPECS

RESULTS_PREFIX = "benchmarks/results/"
BUSY_LOAD = 1.0  # 1-minute load average above which another process may hold the CPUs
# During the run: CPU that processes outside the benchmark's own (it and the servers,
# load generators and workers it started and waited for) used, in cores on average, and
# the share of the machine's time the hypervisor gave to other guests (steal), above
# which the run is marked busy.
BUSY_OTHERS_CORES = 0.15
BUSY_STEAL_SHARE = 0.05
SYNTHETIC_LABEL = "synthetic histories (dynemb.data.synthetic, seeded): not real users' behaviour"
MAX_LISTED = 8  # uncommitted paths named in markdown (the JSON has them all)
PACKAGES = (
    "torch",
    "onnxruntime",
    "nvidia-pytriton",
    "tritonclient",
    "grpcio",
    "numpy",
    "fastapi",
    "uvicorn",
    "locust",
)


@dataclass(frozen=True)
class StageSettings:
    """How one model batches: what Triton was told (specs) or what it serves (config)."""

    instances: int
    max_batch_size: int
    max_queue_delay_us: int | None  # None: no dynamic batching (ensembles)


@dataclass
class RunContext:
    command: str
    started_at: str  # UTC, ISO-8601
    git_commit: str
    uncommitted: list[str] | None  # paths differing from the commit; None: git unknown
    machine: dict[str, Any]
    load_average: tuple[float, float, float]  # 1, 5, 15 minutes, at start
    versions: dict[str, str]
    stages: dict[str, StageSettings]  # from dynemb.ensembles.STAGE_SPECS
    served: dict[str, StageSettings] = field(default_factory=dict)  # from the live server
    load_average_end: tuple[float, float, float] | None = None  # set by finish()
    data: str = SYNTHETIC_LABEL
    notes: list[str] = field(default_factory=list)
    # What the rest of the machine did during the run (set by finish()): see CpuUsage.
    others_cores: float | None = None
    steal_share: float | None = None
    _usage_at_start: CpuUsage | None = field(default=None, repr=False)

    @property
    def busy(self) -> bool:
        return self.load_average[0] > BUSY_LOAD

    def load_warning(self) -> str | None:
        """A warning to print and record when the machine was busy before the run."""
        if not self.busy:
            return None
        one, five, fifteen = self.load_average
        return (
            f"load average at start {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) "
            f"> {BUSY_LOAD} on {self.machine.get('cpu_count')} CPUs: another process may be "
            "using the CPUs; rerun on a quiet machine before quoting these numbers"
        )

    def usage_warning(self) -> str | None:
        """A warning when other processes, or other guests of the host, took CPU during
        the run (the load average at the start cannot see them)."""
        found = []
        if self.others_cores is not None and self.others_cores > BUSY_OTHERS_CORES:
            found.append(f"other processes used {self.others_cores:.2f} cores on average")
        if self.steal_share is not None and self.steal_share > BUSY_STEAL_SHARE:
            found.append(f"the hypervisor took {100 * self.steal_share:.0f}% of the CPU time")
        if not found:
            return None
        return f"during the run {' and '.join(found)}: these numbers are not a quiet machine's"

    def finish(self) -> None:
        """Record the load average at the end (it includes the benchmark's own load) and
        what the rest of the machine used during the run."""
        self.load_average_end = load_average()
        now = CpuUsage.now()
        if self._usage_at_start is not None and now is not None:
            self.others_cores, self.steal_share = now.since(self._usage_at_start)

    def settings_mismatch(self) -> list[str]:
        """Models whose served batching settings differ from the specs (a stale build)."""
        return [
            name
            for name, spec in self.stages.items()
            if name in self.served and self.served[name] != spec
        ]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("_usage_at_start", None)
        out["load_warning"] = self.load_warning()
        out["usage_warning"] = self.usage_warning()
        out["settings_mismatch"] = self.settings_mismatch()
        return out


def loopback_target(host: str | None) -> str:
    """ "HOST:PORT" for a loopback HOST, else ValueError: benchmarks load only this machine."""
    if not host:
        raise ValueError("no host: pass --host 127.0.0.1:PORT (the server's gRPC port)")
    name, sep, port = host.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"host must be HOST:PORT with a gRPC port, got {host!r}")
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    if bare != "localhost":
        try:
            loopback = ipaddress.ip_address(bare).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"refusing {host!r}: benchmarks only load a loopback address")
    return f"{name}:{int(port)}"


def command_line(argv: list[str] | None = None) -> str:
    """The exact command, with the interpreter, as one copy-pastable shell line."""
    argv = sys.argv if argv is None else argv
    program = Path(argv[0]).name if argv else ""
    if program.endswith(".py"):  # run as a script: name the interpreter too
        return shlex.join([_relative(sys.executable), *argv])
    return shlex.join([_relative(argv[0]) if argv else "", *argv[1:]])


def _relative(path: str) -> str:
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return path


def git_state(root: Path | None = None) -> tuple[str, list[str] | None]:
    """(commit, uncommitted paths, untracked ones included, result files left out): a result
    made from code that is not in the commit says so. ("unknown", None) without git."""
    root = root or Path(__file__).resolve().parent  # the code that runs, not the cwd
    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        status = _git(root, "status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return commit or "unknown", [p for p in paths if not p.startswith(RESULTS_PREFIX)]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout


def memory_bytes() -> int | None:
    """Total physical memory, from /proc/meminfo (Linux) or sysconf."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def cpu_model() -> str:
    """The CPU's marketing name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    total = memory_bytes()
    return {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(total / 2**30, 1) if total else None,
    }


def load_average() -> tuple[float, float, float]:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:  # not available on this platform
        return (float("nan"),) * 3
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def versions(tritonserver: str | None = None) -> dict[str, str]:
    """Python and package versions, read from metadata (importing torch takes seconds)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["tritonserver"] = tritonserver or "unknown (no server queried)"
    return out


def spec_settings() -> dict[str, StageSettings]:
    """Instance counts and dynamic-batching settings of every stage, from its spec."""
    out = {
        name: StageSettings(spec.instances, spec.max_batch_size, spec.max_queue_delay_us)
        for name, spec in STAGE_SPECS.items()
    }
    out.update(
        {name: StageSettings(1, spec.max_batch_size, None) for name, spec in ENSEMBLE_SPECS.items()}
    )
    return out


def served_settings(configs: dict[str, dict[str, Any]]) -> dict[str, StageSettings]:
    """The same settings from `get_model_config(name, as_json=True)` answers, by model."""
    out = {}
    for name, answer in configs.items():
        config = answer.get("config", answer)
        batching = config.get("dynamic_batching")
        groups = config.get("instance_group") or []
        out[name] = StageSettings(
            instances=sum(int(g.get("count", 1)) for g in groups) or 1,
            max_batch_size=int(config.get("max_batch_size", 0)),
            max_queue_delay_us=(
                int(batching.get("max_queue_delay_microseconds", 0))
                if batching is not None
                else None
            ),
        )
    return out


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds so far: the whole machine's busy and stolen time (/proc/stat), and this
    process's with every child it has waited for (os.times), which holds the servers,
    load generators and workers a benchmark starts and stops."""

    wall: float
    machine_busy: float
    machine_total: float  # busy + idle + iowait + steal
    steal: float
    own: float

    @classmethod
    def now(cls) -> CpuUsage | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None  # not Linux: nothing measured, nothing claimed
        user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        tick = os.sysconf("SC_CLK_TCK")
        t = os.times()
        return cls(
            wall=time.monotonic(),
            machine_busy=(user + nice + system + irq + softirq) / tick,
            machine_total=(user + nice + system + idle + iowait + irq + softirq + steal) / tick,
            steal=steal / tick,
            own=t.user + t.system + t.children_user + t.children_system,
        )

    def since(self, start: CpuUsage) -> tuple[float, float]:
        """(cores other processes used on average, share of the time stolen) since `start`.
        Children still running are not yet counted as the benchmark's: call it after the
        benchmark stopped what it started."""
        wall = max(self.wall - start.wall, 1e-9)
        others = (self.machine_busy - start.machine_busy) - (self.own - start.own)
        total = max(self.machine_total - start.machine_total, 1e-9)
        return round(max(others, 0.0) / wall, 3), round((self.steal - start.steal) / total, 3)


def collect_context(
    argv: list[str] | None = None, tritonserver: str | None = None, data: str = SYNTHETIC_LABEL
) -> RunContext:
    commit, uncommitted = git_state()
    return RunContext(
        command=command_line(argv),
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        git_commit=commit,
        uncommitted=uncommitted,
        machine=machine(),
        load_average=load_average(),
        versions=versions(tritonserver),
        stages=spec_settings(),
        data=data,
        _usage_at_start=CpuUsage.now(),
    )


@dataclass(frozen=True)
class ModelStats:
    """What one model did between two statistics snapshots."""

    requests: int  # inference_count: batch elements (users) served
    executions: int  # execution_count: batches run
    queue_ms: float  # mean time a request waited in the model's queue
    compute_ms: float  # mean compute_infer time per execution

    @property
    def avg_batch(self) -> float:
        return self.requests / self.executions if self.executions else 0.0


def _counters(snapshot: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Cumulative counters by model name from `get_inference_statistics(as_json=True)`."""
    out = {}
    for row in snapshot.get("model_stats", []):
        stats = row.get("inference_stats", {})
        queue = stats.get("queue", {})
        infer = stats.get("compute_infer", {})
        out[row["name"]] = {
            "requests": int(row.get("inference_count", 0)),
            "executions": int(row.get("execution_count", 0)),
            "queue_count": int(queue.get("count", 0)),
            "queue_ns": int(queue.get("ns", 0)),
            "infer_count": int(infer.get("count", 0)),
            "infer_ns": int(infer.get("ns", 0)),
        }
    return out


def stage_stats(before: dict[str, Any], after: dict[str, Any]) -> dict[str, ModelStats]:
    """Per model, the difference of two snapshots; models that did nothing are left out.

    Several versions of one model (after a swap) are summed under the model's name.
    """
    old, new = _counters(before), _counters(after)
    out = {}
    for name, now in new.items():
        was = old.get(name, {})
        d = {key: value - was.get(key, 0) for key, value in now.items()}
        if d["requests"] <= 0:
            continue
        out[name] = ModelStats(
            requests=d["requests"],
            executions=d["executions"],
            queue_ms=d["queue_ns"] / d["queue_count"] / 1e6 if d["queue_count"] else 0.0,
            compute_ms=d["infer_ns"] / d["infer_count"] / 1e6 if d["infer_count"] else 0.0,
        )
    return dict(sorted(out.items(), key=lambda kv: _model_order(kv[0])))


def _model_order(name: str) -> tuple[int, str]:
    order = [*STAGE_SPECS, *ENSEMBLE_SPECS]
    return (order.index(name) if name in order else len(order), name)


def context_markdown(ctx: RunContext) -> str:
    """The context block every markdown result starts with."""
    if ctx.uncommitted is None:
        dirty = " (working tree state unknown)"
    elif ctx.uncommitted:
        shown = ", ".join(f"`{p}`" for p in ctx.uncommitted[:MAX_LISTED])
        more = (
            f" and {len(ctx.uncommitted) - MAX_LISTED} more"
            if len(ctx.uncommitted) > MAX_LISTED
            else ""
        )
        dirty = f", plus uncommitted changes to {shown}{more}"
    else:
        dirty = " (clean working tree)"
    m = ctx.machine
    one, five, fifteen = ctx.load_average
    lines = [
        f"- command: `{ctx.command}`",
        f"- started: {ctx.started_at}",
        f"- git commit: `{ctx.git_commit}`{dirty}",
        f"- machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, "
        f"{m['memory_gib']} GiB memory",
        f"- load average at start (1/5/15 min): {one} / {five} / {fifteen}"
        + (
            f"; at the end, with the benchmark's own load: "
            f"{' / '.join(map(str, ctx.load_average_end))}"
            if ctx.load_average_end
            else ""
        ),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ctx.versions.items()),
        f"- data: {ctx.data}",
    ]
    if ctx.others_cores is not None:
        lines.append(
            f"- during the run: other processes used {ctx.others_cores:.2f} cores on average; "
            f"the hypervisor took {100 * (ctx.steal_share or 0):.1f}% of the CPU time"
        )
    for warning in (ctx.load_warning(), ctx.usage_warning()):
        if warning:
            lines.append(f"- **WARNING: {warning}**")
    lines.extend(f"- note: {note}" for note in ctx.notes)
    mismatch = ctx.settings_mismatch()
    if mismatch:
        lines.append(f"- **served settings differ from dynemb.specs for: {', '.join(mismatch)}**")
    lines += [
        "",
        "| model | instances | max batch | max queue delay (µs) |",
        "|---|---:|---:|---:|",
    ]
    settings = ctx.served or ctx.stages
    for name, s in settings.items():
        delay = "ensemble" if s.max_queue_delay_us is None else str(s.max_queue_delay_us)
        lines.append(f"| {name} | {s.instances} | {s.max_batch_size} | {delay} |")
    source = "the live server's configs" if ctx.served else "dynemb.ensembles.STAGE_SPECS"
    lines.append(f"\n(batching settings as read from {source})")
    return "\n".join(lines)


def stats_markdown(stats: dict[str, ModelStats]) -> str:
    lines = [
        "| model | requests (users) | executions | avg batch | queue ms/request | "
        "compute ms/execution |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s.requests} | {s.executions} | {s.avg_batch:.2f} | "
            f"{s.queue_ms:.2f} | {s.compute_ms:.2f} |"
        )
    return "\n".join(lines)


def write_results(stem: Path, result: Any, context: RunContext, markdown: str) -> None:
    """`stem`.json (the result's fields, its context as recorded) and `stem`.md."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = asdict(result)
    payload["context"] = context.as_dict()
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown, encoding="utf-8")
