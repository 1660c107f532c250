"""`dynemb bench-gpu`: issue 13's GPU check as one command that ends inside its budget.

On a GPU machine it builds a gpu-target repository (seeded weights of the trained model's
shapes: what a request costs does not depend on the weights), checks E_t on the GPU
against the CPU fp32 pipeline for probe users at each precision, measures the neural
stages in-process at several batch sizes, then serves the gpu variant with tritonserver
(KIND_GPU instances, torch on CUDA, DLPack between stages) and measures throughput and
p50/p99 at several concurrencies and users per request, and again without DLPack, so the
hand-over is measured rather than assumed. It writes `gpu.json` and `gpu.md` to `--out`
and prints a short table last.

Every phase has a share of `budget_s`; a phase that no longer fits is skipped and the
results say so, so the command never overruns (the device tool gives one command 10
minutes, and a session's 15 must hold a run and a rerun). `--device cpu` runs the same
phases at tiny sizes on the CPU: the dry run tests/integration/test_bench_gpu.py runs in
CI (it is not a GPU measurement and says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynemb import stages
from dynemb.bench.closedloop import LoadResult, closed_loop
from dynemb.bench.context import (
    ModelStats,
    RunContext,
    StageSettings,
    collect_context,
    context_markdown,
    served_settings,
    stage_stats,
    stats_markdown,
)
from dynemb.bench.histories import HistorySet, synthetic_with_images
from dynemb.configs import write_configs
from dynemb.ensembles import ENSEMBLE_NAMES, stage_specs
from dynemb.errors import UsageError
from dynemb.pipeline import Pipeline, eager_uncached, serving_manifests
from dynemb.repository import BuildOptions, build_repository
from dynemb.stages import RunnerOptions
from dynemb.stages.llm_encoder import MINILM_LAYERS
from dynemb.targets import GPU, Target
from dynemb_client import Event, build_inputs

log = logging.getLogger(__name__)

COSINE_TARGET = 0.999  # issue 13: E_t on the GPU within cosine 0.999 of CPU fp32
SERVED_TARGET_USERS_S = 30_000  # issue 13 (moonshot): served users/s at p99 <= 20 ms
P99_TARGET_MS = 20.0
SERVED_OVER_INPROCESS_TARGET = 0.8
# Seconds each phase needs at least; a phase that cannot get them is skipped.
NEED_S = {"build": 20, "parity": 10, "inprocess": 10, "served": 60, "served-no-dlpack": 45}
RESERVE_S = 10  # for writing the results


@dataclass(frozen=True)
class GpuBenchOptions:
    out: Path
    device: str = "cuda"  # "cpu": the dry run (tiny sizes, no GPU)
    repository: Path | None = None  # built here; default: a temporary folder
    users: int = 512  # SYNTHETIC histories with images, full 50-event windows
    probes: int = 64  # users checked against the CPU fp32 answers
    precisions: tuple[str, ...] = ("fp32", "bf16", "fp16")
    batches: tuple[int, ...] = (64, 256, 1024)
    # Served points: (users per request, concurrent clients), with DLPack, then the
    # `no_dlpack_points` again without it.
    points: tuple[tuple[int, int], ...] = ((1, 1), (1, 16), (64, 4), (64, 16), (64, 64))
    no_dlpack_points: tuple[tuple[int, int], ...] = ((64, 16), (64, 64))
    seconds: float = 6.0  # measured window per served point and per in-process batch size
    warmup_s: float = 2.0
    budget_s: float = 300.0
    host_instances: int = 8  # preprocess and retrieve
    neural_instances: int = 2
    cuda_pool_mb: int = 2048  # Triton's CUDA memory pool for GPU tensors between stages
    seed: int = 0

    @classmethod
    def dry_run(cls, out: Path, repository: Path | None = None) -> GpuBenchOptions:
        """Every phase at tiny sizes on the CPU: the code path, not a measurement."""
        return cls(
            out=out,
            device="cpu",
            repository=repository,
            users=24,
            probes=6,
            precisions=("fp32",),
            batches=(4, 16),
            points=((1, 1), (4, 2)),
            no_dlpack_points=((4, 2),),
            seconds=1.0,
            warmup_s=0.5,
            budget_s=300.0,
            host_instances=1,
            neural_instances=1,
            cuda_pool_mb=0,
        )

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def target(self, precision: str, dlpack: bool) -> Target:
        """The gpu variant as this run serves it (device, precision, DLPack, sizes)."""
        return dataclasses.replace(
            GPU,
            device=self.device,
            precision=precision,
            dlpack=dlpack,
            host_instances=self.host_instances,
            neural_instances=self.neural_instances,
        )


@dataclass
class Parity:
    """E_t of the probe users at one precision against the CPU fp32 pipeline."""

    where: str  # "in-process" or "served"
    precision: str
    users: int = 0
    cosine_min: float | None = None
    cosine_mean: float | None = None
    max_abs_diff: float | None = None
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and (self.cosine_min or 0.0) >= COSINE_TARGET


@dataclass
class InProcessPoint:
    """The neural stages on the device, chained (tensors stay there), from preprocessed
    host tensors (their copy to the device included) to E_t on the host."""

    precision: str
    batch: int
    batches: int
    users_per_s: float
    batch_p50_ms: float
    batch_p99_ms: float
    peak_memory_mb: float | None


@dataclass
class ServedPoint:
    dlpack: bool
    users_per_request: int
    concurrency: int
    users_per_s: float
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    calls: int
    failed: int
    errors: list[str]
    client_cpu: float  # the load generator's CPU, in cores (near 1.0: it may be the limit)
    gpu_util: float | None  # mean GPU utilisation (%) during the window, if readable
    stages: dict[str, dict[str, float]]  # Triton's per-model statistics for the window


@dataclass
class GpuBenchResult:
    device: dict[str, Any]
    dry_run: bool
    weights: str
    options: dict[str, Any]
    serving_precision: str = "fp32"
    parity: list[Parity] = field(default_factory=list)
    preprocess_users_per_s_per_core: float | None = None
    inprocess: list[InProcessPoint] = field(default_factory=list)
    served: list[ServedPoint] = field(default_factory=list)
    server_start_s: dict[str, float] = field(default_factory=dict)
    # What each live server's neural stages were configured with (read back from it):
    # "dlpack=True" -> model -> parameters (device, precision, dlpack, FORCE_CPU_ONLY...).
    served_parameters: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    phase_s: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    targets: dict[str, Any] = field(default_factory=dict)
    total_s: float = 0.0


class Budget:
    """The run's deadline: a phase starts only if its minimum still fits."""

    def __init__(self, seconds: float) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def allows(self, phase: str, result: GpuBenchResult) -> bool:
        left = self.left()
        if left >= NEED_S[phase]:
            return True
        result.skipped.append(
            f"{phase}: skipped, {max(left, 0):.0f} s of the budget left, it needs "
            f"{NEED_S[phase]} s (rerun with a larger --budget-s or fewer points)"
        )
        return False


# --- the machine -----------------------------------------------------------------------


def check_device(device: str) -> None:
    """A CUDA device that is there, or "cpu" (the dry run), before anything is written."""
    import torch

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise UsageError(f"--device must be cuda, cuda:N or cpu, got {device!r}")
    if not torch.cuda.is_available():
        raise UsageError(
            f"no CUDA device here for --device {device} (torch {torch.__version__}); "
            "`--device cpu --dry-run` checks the command on the CPU"
        )
    index = torch.device(device).index or 0
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()}")


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            driver=_nvidia_smi("driver_version"),
        )
    else:
        info["name"] = "CPU (dry run: no GPU)"
    return info


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


class GpuSampler:
    """Mean GPU utilisation over a window, read through NVML where it is installed."""

    def __init__(self, on_gpu: bool) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._handle = None
        if on_gpu:
            with contextlib.suppress(Exception):
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)

    @contextlib.contextmanager
    def window(self) -> Iterator[None]:
        self.samples, self._stop = [], threading.Event()
        thread = threading.Thread(target=self._run, daemon=True)
        if self._handle is not None:
            thread.start()
        try:
            yield
        finally:
            self._stop.set()
            if thread.is_alive():
                thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            with contextlib.suppress(Exception):
                rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
                self.samples.append(float(rates.gpu))

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


# --- phases ----------------------------------------------------------------------------


def _pretrained_available() -> bool:
    try:
        from dynemb.stages.llm_encoder import minilm_path

        return (minilm_path() / "model.safetensors").is_file()
    except Exception:  # the package is not installed: a seeded build
        return False


def build(options: GpuBenchOptions, repository: Path, result: GpuBenchResult) -> None:
    pretrained = _pretrained_available()
    result.weights = (
        f"seeded, untrained; MiniLM's first {MINILM_LAYERS} layers "
        + ("pretrained" if pretrained else "seeded too (its weights are not on this machine)")
        + "; the trained model's shapes: a request's cost does not depend on the weights"
    )
    build_repository(
        BuildOptions(
            repository=repository,
            catalogue="synthetic",
            seed=options.seed,
            target=options.target("fp32", True),
            pretrained=pretrained,
        )
    )


def probe_users(histories: HistorySet, n: int) -> tuple[list[list[Event]], list[float]]:
    """`n` users: an empty history, a 3-event one, and full windows, each with its query
    time (a cold start's default would be "now": not the same for two calls)."""
    users = [[], histories.users[0][-3:], *histories.users[: max(n - 2, 0)]]
    at = [histories.at[0], histories.at[0], *histories.at[: max(n - 2, 0)]]
    return users[:n], at[:n]


def compare(where: str, precision: str, got: np.ndarray, want: np.ndarray) -> Parity:
    cosine = np.sum(got * want, axis=1) / (
        np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    )
    return Parity(
        where,
        precision,
        users=len(got),
        cosine_min=float(cosine.min()),
        cosine_mean=float(cosine.mean()),
        max_abs_diff=float(np.abs(got - want).max()),
    )


def device_options(device: str, precision: str, dlpack: bool) -> dict[str, RunnerOptions]:
    on_device = RunnerOptions(runtime="torch", device=device, precision=precision, dlpack=dlpack)
    return {name: on_device for name in stages.NAMES if stages.get(name).neural}


def parity(
    options: GpuBenchOptions, repository: Path, wire: dict, result: GpuBenchResult
) -> np.ndarray:
    """E_t of the probe users on the device at each precision vs the CPU fp32 pipeline;
    returns the reference, and sets the serving precision: the lowest that holds."""
    reference = Pipeline.from_repository(repository, eager_uncached()).embed(wire)
    for precision in options.precisions:
        try:
            pipeline = Pipeline.from_repository(
                repository, device_options(options.device, precision, True)
            )
            got = pipeline.embed(wire)
        except Exception as exc:  # a precision the device cannot run is a result too
            result.parity.append(Parity("in-process", precision, error=f"{exc!r}"[:300]))
            continue
        result.parity.append(compare("in-process", precision, got, reference))
    passing = [p.precision for p in result.parity if p.passed]
    for precision in ("bf16", "fp16", "fp32"):
        if precision in passing:
            result.serving_precision = precision
            break
    else:
        result.notes.append("no precision held the E_t parity: serving fp32 anyway")
    return reference


def _tile(tensors: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    users = len(next(iter(tensors.values())))
    rows = np.arange(batch) % users
    return {name: np.ascontiguousarray(value[rows]) for name, value in tensors.items()}


def inprocess(
    options: GpuBenchOptions,
    repository: Path,
    histories: HistorySet,
    budget: Budget,
    result: GpuBenchResult,
) -> None:
    """The neural stages chained on the device at each batch size (for the serving
    precision and fp32), and preprocess (CPU, one core, warm caches) per user."""
    import torch

    cpu = Pipeline.from_repository(repository)  # preprocess as served, with its caches
    wire = build_inputs(
        histories.users, histories.at, cpu_dims(cpu).max_events, cpu_dims(cpu).max_labels
    )
    pre = cpu.runners["preprocess"]
    pre(wire)  # warm its caches, as a served preprocess is after the warm-up pass
    t0, users = time.perf_counter(), 0
    while time.perf_counter() - t0 < min(options.seconds, 3.0):
        pre(wire)
        users += len(histories)
    result.preprocess_users_per_s_per_core = users / (time.perf_counter() - t0)
    tensors = pre(wire)
    neural = [n for n in stages.NAMES if stages.get(n).neural]
    per_point = options.seconds + 2.0
    for precision in dict.fromkeys((result.serving_precision, "fp32")):
        pipeline = Pipeline.from_repository(
            repository, device_options(options.device, precision, True)
        )
        for batch in options.batches:
            if budget.left() < per_point + NEED_S["served"]:
                result.skipped.append(
                    f"in-process {precision} batch {batch}: skipped to leave the served "
                    "phase its budget"
                )
                continue
            x = _tile(tensors, batch)
            if options.on_gpu:
                torch.cuda.reset_peak_memory_stats()

            def chain(x: dict = x, pipeline: Pipeline = pipeline) -> None:
                current = dict(x)
                for name in neural:
                    runner = pipeline.runners[name]
                    current.update(runner({t.name: current[t.name] for t in runner.spec.inputs}))
                current["USER_EMBEDDING"].cpu()  # E_t on the host: the work is done

            for _ in range(2):
                chain()  # warm-up: kernels chosen, memory pooled
            latencies = []
            start = time.perf_counter()
            while time.perf_counter() - start < options.seconds:
                t = time.perf_counter()
                chain()
                latencies.append(1000 * (time.perf_counter() - t))
            spent = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**20 if options.on_gpu else None
            result.inprocess.append(
                InProcessPoint(
                    precision,
                    batch,
                    len(latencies),
                    batch * len(latencies) / spent,
                    float(np.percentile(latencies, 50)),
                    float(np.percentile(latencies, 99)),
                    peak,
                )
            )
        del pipeline
        if options.on_gpu:
            torch.cuda.empty_cache()


def cpu_dims(pipeline: Pipeline):
    return next(iter(pipeline.runners.values())).manifest.dims


@contextlib.contextmanager
def serving(
    options: GpuBenchOptions, repository: Path, target: Target, log_name: str, budget: Budget
) -> Iterator[Any]:
    """tritonserver on the repository with `target`'s configs (rewritten in place)."""
    from dynemb.server import ServerConfig, TritonServer, free_port

    write_configs(repository, target=target)
    config = ServerConfig(
        repository,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=options.out / log_name,
        models=(*stages.NAMES, *ENSEMBLE_NAMES),
        startup_timeout_s=max(30.0, min(300.0, budget.left() - 30)),
        cuda_memory_pool_mb=options.cuda_pool_mb if options.on_gpu else 0,
    )
    server = TritonServer(config)
    with server:
        yield server


def served(
    options: GpuBenchOptions,
    url: str,
    histories: HistorySet,
    points: tuple[tuple[int, int], ...],
    dlpack: bool,
    budget: Budget,
    sampler: GpuSampler,
    result: GpuBenchResult,
) -> None:
    asyncio.run(_served(options, url, histories, points, dlpack, budget, sampler, result))


async def _served(options, url, histories, points, dlpack, budget, sampler, result) -> None:
    import tritonclient.grpc as grpcclient

    from dynemb_client import AsyncInterestClient

    admin = grpcclient.InferenceServerClient(url)
    async with AsyncInterestClient(url, retries=0, timeout_s=120) as client:
        prepared: dict[int, list] = {}
        for per_request, concurrency in points:
            if budget.left() < options.seconds + options.warmup_s + 5:
                result.skipped.append(
                    f"served {per_request} users/request x {concurrency} clients "
                    f"(dlpack={dlpack}): skipped, out of budget"
                )
                continue
            if per_request not in prepared:
                prepared[per_request] = await _prepare(client, histories, per_request)
                await _warm(client, prepared[per_request])
            calls = prepared[per_request]

            async def one(i: int, calls: list = calls, per_request: int = per_request) -> int:
                await client.embed_prepared(calls[i % len(calls)])
                return per_request

            before = admin.get_inference_statistics(as_json=True)
            cpu0, wall0 = time.process_time(), time.perf_counter()
            with sampler.window():
                load = await closed_loop(one, concurrency, options.seconds, options.warmup_s)
            client_cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
            after = admin.get_inference_statistics(as_json=True)
            result.served.append(
                _point(load, dlpack, per_request, client_cpu, sampler.mean, before, after)
            )
    admin.close()


async def _prepare(client, histories: HistorySet, per_request: int) -> list:
    """Every user once, `per_request` users a request (the last request filled round)."""
    calls = []
    n = len(histories)
    for start in range(0, n, per_request):
        rows = [(start + j) % n for j in range(per_request)]
        calls.append(
            await client.prepare_embed(
                [histories.users[i] for i in rows], at=[histories.at[i] for i in rows]
            )
        )
    return calls


async def _warm(client, calls: list, concurrency: int = 8) -> None:
    """One pass over every prepared request: preprocess's caches then hold every item."""
    gate = asyncio.Semaphore(concurrency)

    async def bounded(call) -> None:
        async with gate:
            await client.embed_prepared(call)

    await asyncio.gather(*(bounded(c) for c in calls))


def _point(load: LoadResult, dlpack, per_request, client_cpu, gpu_util, before, after):
    stats = stage_stats(before, after)
    return ServedPoint(
        dlpack=dlpack,
        users_per_request=per_request,
        concurrency=load.concurrency,
        users_per_s=load.users_per_s,
        requests_per_s=(load.calls - load.failed) / load.seconds if load.seconds else 0.0,
        p50_ms=load.percentile(50),
        p99_ms=load.percentile(99),
        calls=load.calls,
        failed=load.failed,
        errors=load.errors,
        client_cpu=round(client_cpu, 2),
        gpu_util=gpu_util,
        stages={name: {**asdict(s), "avg_batch": s.avg_batch} for name, s in stats.items()},
    )


def served_parity(url: str, users, at, reference: np.ndarray, precision: str) -> Parity:
    from dynemb_client import InterestClient

    with InterestClient(url, retries=0, timeout_s=120) as client:
        got = client.embed_many(users, at=at)
    return compare("served", precision, got, reference)


# --- the run ---------------------------------------------------------------------------


def run_gpu_bench(
    options: GpuBenchOptions, say: Callable[[str], None] = print
) -> tuple[GpuBenchResult, RunContext]:
    """Every phase within the budget; results in `options.out` (gpu.json, gpu.md)."""
    check_device(options.device)
    budget = Budget(options.budget_s)
    options.out.mkdir(parents=True, exist_ok=True)
    context = collect_context()
    target = options.target("fp32", True)
    context.stages = {
        name: StageSettings(s.instances, s.max_batch_size, s.max_queue_delay_us)
        for name, s in stage_specs(target=target).items()
    }
    result = GpuBenchResult(
        device=device_info(options.device),
        dry_run=not options.on_gpu,
        weights="",
        options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
    )
    result.notes.extend(environment_notes())
    if result.dry_run:
        result.notes.append(
            "DRY RUN on the CPU (--device cpu, tiny sizes): it checks the code path, it is "
            "NOT a GPU measurement"
        )
    histories = synthetic_with_images(options.users, seed=7)
    users, at = probe_users(histories, options.probes)
    owned = options.repository is None
    repository = options.repository or Path(tempfile.mkdtemp(prefix="dynemb-gpu-")) / "repo"
    sampler = GpuSampler(options.on_gpu)

    def phase(name: str, work: Callable[[], Any]) -> Any:
        say(f"[{time.monotonic() - budget.started:6.1f} s] {name}")
        start = time.monotonic()
        try:
            return work()
        finally:
            result.phase_s[name] = round(time.monotonic() - start, 1)

    try:
        phase("build", lambda: build(options, repository, result))
        dims = serving_manifests(repository)["preprocess"].dims
        wire = build_inputs(users, at, dims.max_events, dims.max_labels)
        reference = (
            phase("parity", lambda: parity(options, repository, wire, result))
            if budget.allows("parity", result)
            else None
        )
        if budget.allows("inprocess", result):
            phase("inprocess", lambda: inprocess(options, repository, histories, budget, result))
        for dlpack, points, name in (
            (True, options.points, "served"),
            (False, options.no_dlpack_points, "served-no-dlpack"),
        ):
            if not points or not budget.allows(name, result):
                continue
            serve_target = options.target(result.serving_precision, dlpack)

            def measure(
                serve_target: Target = serve_target, dlpack: bool = dlpack, points=points
            ) -> None:
                start = time.monotonic()
                log_name = f"tritonserver-{'dlpack' if dlpack else 'no-dlpack'}.log"
                with serving(options, repository, serve_target, log_name, budget) as server:
                    result.server_start_s[f"dlpack={dlpack}"] = round(time.monotonic() - start, 1)
                    url = server.config.grpc_url
                    configs = _served_configs(url)
                    result.served_parameters[f"dlpack={dlpack}"] = {
                        name: _parameters(answer)
                        for name, answer in configs.items()
                        if name in stages.NAMES and stages.get(name).neural
                    }
                    if dlpack:
                        context.served = served_settings(configs)
                        context.versions["tritonserver"] = _server_version(url)
                    if reference is not None:
                        check = served_parity(url, users, at, reference, result.serving_precision)
                        check.where = f"served (dlpack={dlpack})"
                        result.parity.append(check)
                    served(options, url, histories, points, dlpack, budget, sampler, result)

            try:
                phase(name, measure)
            except Exception as exc:  # the served phase failing is a result, not a crash
                result.skipped.append(f"{name}: failed: {exc!r}"[:2000])
    finally:
        if owned:
            shutil.rmtree(repository.parent, ignore_errors=True)
        result.total_s = round(time.monotonic() - budget.started, 1)
        result.targets = targets(result)
        context.finish()
        write(options.out, result, context)
    return result, context


def _served_configs(url: str) -> dict[str, dict[str, Any]]:
    """Every loaded model's config as the live server reports it."""
    import tritonclient.grpc as grpcclient

    admin = grpcclient.InferenceServerClient(url)
    try:
        names = (*stages.NAMES, *ENSEMBLE_NAMES)
        return {n: admin.get_model_config(n, as_json=True) for n in names}
    finally:
        admin.close()


def _parameters(answer: dict[str, Any]) -> dict[str, str]:
    config = answer.get("config", answer)
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def _server_version(url: str) -> str:
    import tritonclient.grpc as grpcclient

    admin = grpcclient.InferenceServerClient(url)
    try:
        return admin.get_server_metadata(as_json=True).get("version", "unknown")
    finally:
        admin.close()


def targets(result: GpuBenchResult) -> dict[str, Any]:
    """Issue 13's targets against what was measured (None: not measured)."""
    served_dl = [p for p in result.served if p.dlpack and p.failed == 0]
    fast = [p for p in served_dl if p.p99_ms is not None and p.p99_ms <= P99_TARGET_MS]
    best_served = max((p.users_per_s for p in served_dl), default=None)
    best_fast = max((p.users_per_s for p in fast), default=None)
    best_inprocess = max(
        (p.users_per_s for p in result.inprocess if p.precision == result.serving_precision),
        default=None,
    )
    ratio = best_served / best_inprocess if best_served and best_inprocess else None
    parity_checked = [p for p in result.parity if p.precision == result.serving_precision]
    return {
        "served_users_per_s_at_p99_le_20ms": best_fast,
        "served_30k_users_per_s_met": None if best_fast is None else best_fast >= 30_000,
        "served_over_inprocess": ratio,
        "served_over_inprocess_met": None if ratio is None else ratio >= 0.8,
        "parity_cosine_min": min((p.cosine_min or 0.0 for p in parity_checked), default=None),
        "parity_met": bool(parity_checked) and all(p.passed for p in parity_checked),
        "dlpack_over_no_dlpack": _dlpack_ratio(result.served),
    }


def _dlpack_ratio(points: list[ServedPoint]) -> dict[str, float]:
    """Per (users per request, clients) measured both ways: with / without DLPack."""
    on = {(p.users_per_request, p.concurrency): p.users_per_s for p in points if p.dlpack}
    out = {}
    for p in points:
        key = (p.users_per_request, p.concurrency)
        if not p.dlpack and key in on and p.users_per_s:
            out[f"{key[0]}x{key[1]}"] = on[key] / p.users_per_s
    return out


# --- results ---------------------------------------------------------------------------


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(result: GpuBenchResult, context: RunContext) -> str:
    d = result.device
    title = "dry run on the CPU (NOT a GPU measurement)" if result.dry_run else d.get("name")
    lines = [
        f"# GPU benchmark: {title}",
        "",
        f"`dynemb bench-gpu` (src/dynemb/bench/gpu.py); total {result.total_s} s of a "
        f"{result.options['budget_s']} s budget.",
        "",
        "## Context",
        "",
        context_markdown(context),
        "",
        "- device: " + ", ".join(f"{k} {v}" for k, v in d.items()),
        f"- weights: {result.weights}",
        "- histories: SYNTHETIC users with a drawn image on every item, full 50-event "
        "windows; several users per request where the table says so (realistic at these "
        "rates: a caller batches its users)",
        f"- serving precision: {result.serving_precision} (the lowest whose E_t held "
        f"cosine >= {COSINE_TARGET} in-process)",
    ]
    lines += [f"- note: {n}" for n in result.notes]
    lines += [f"- **skipped: {s}**" for s in result.skipped]
    lines += [
        "",
        "## E_t parity against the CPU fp32 pipeline",
        "",
        "| where | precision | users | cosine min | cosine mean | max abs diff | held |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for p in result.parity:
        held = "yes" if p.passed else f"NO {p.error or ''}".strip()
        lines.append(
            f"| {p.where} | {p.precision} | {p.users} | {_f(p.cosine_min, 6)} | "
            f"{_f(p.cosine_mean, 6)} | {_f(p.max_abs_diff, 6)} | {held} |"
        )
    lines += [
        "",
        "## In-process (neural stages chained on the device, host tensors in, E_t out)",
        "",
        f"preprocess (CPU, one core, warm caches): "
        f"{_f(result.preprocess_users_per_s_per_core)} users/s per core",
        "",
        "| precision | batch | batches | users/s | batch p50 ms | batch p99 ms | peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result.inprocess:
        lines.append(
            f"| {p.precision} | {p.batch} | {p.batches} | {_f(p.users_per_s)} | "
            f"{_f(p.batch_p50_ms, 2)} | {_f(p.batch_p99_ms, 2)} | {_f(p.peak_memory_mb, 0)} |"
        )
    lines += [
        "",
        "## Served (tritonserver, gpu variant, closed loop over gRPC)",
        "",
        f"server start to ready: {result.server_start_s}",
        "",
        *(
            f"- server {which}, neural stages as configured (read back from it): "
            + "; ".join(
                f"{name} " + ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
                for name, params in models.items()
            )
            for which, models in result.served_parameters.items()
        ),
        "",
        "| DLPack | users/request | clients | users/s | requests/s | p50 ms | p99 ms | "
        "failed | client CPU (cores) | GPU util % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result.served:
        lines.append(
            f"| {'on' if p.dlpack else 'off'} | {p.users_per_request} | {p.concurrency} | "
            f"{_f(p.users_per_s)} | {_f(p.requests_per_s)} | {_f(p.p50_ms, 2)} | "
            f"{_f(p.p99_ms, 2)} | {p.failed} | {p.client_cpu} | {_f(p.gpu_util)} |"
        )
    best = max(result.served, key=lambda p: p.users_per_s, default=None)
    if best is not None and best.stages:
        lines += [
            "",
            f"Per model at the best point ({best.users_per_request} users/request, "
            f"{best.concurrency} clients, DLPack {'on' if best.dlpack else 'off'}):",
            "",
            stats_markdown({n: ModelStats(**_stats_fields(s)) for n, s in best.stages.items()}),
        ]
    t = result.targets
    lines += [
        "",
        "## Issue 13's targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        f"| >= 30,000 users/s served at p99 <= 20 ms | "
        f"{_f(t.get('served_users_per_s_at_p99_le_20ms'))} | "
        f"{_met(t.get('served_30k_users_per_s_met'))} |",
        f"| served / in-process >= 0.8 | {_f(t.get('served_over_inprocess'), 2)} | "
        f"{_met(t.get('served_over_inprocess_met'))} |",
        f"| E_t cosine >= 0.999 vs CPU fp32, every probe user | "
        f"{_f(t.get('parity_cosine_min'), 6)} | {_met(t.get('parity_met'))} |",
        f"| DLPack on / off (users/s) | {t.get('dlpack_over_no_dlpack') or '-'} | measured |",
    ]
    return "\n".join(lines) + "\n"


def _stats_fields(stats: dict[str, float]) -> dict[str, float]:
    names = {f.name for f in dataclasses.fields(ModelStats)}
    return {k: v for k, v in stats.items() if k in names}


def _met(value: bool | None) -> str:
    return "not measured" if value is None else ("met" if value else "missed")


def write(out: Path, result: GpuBenchResult, context: RunContext) -> None:
    from dynemb.bench.context import write_results

    write_results(out / "gpu", result, context, markdown(result, context))


def summary(result: GpuBenchResult) -> str:
    """The short table printed last (the device tool returns the end of the output)."""
    rows = [
        f"GPU bench: {result.device.get('name')} | weights {result.weights.split(';')[0]} | "
        f"serving {result.serving_precision} | {result.total_s} s",
        *(
            f"  parity {p.where:<22} {p.precision:<5} cos_min={_f(p.cosine_min, 6)} "
            f"max_abs={_f(p.max_abs_diff, 6)} {'ok' if p.passed else 'FAIL ' + (p.error or '')}"
            for p in result.parity
        ),
        f"  preprocess {_f(result.preprocess_users_per_s_per_core)} users/s/core",
        *(
            f"  in-process {p.precision:<5} batch {p.batch:>5}: {_f(p.users_per_s):>12} users/s "
            f"p50 {_f(p.batch_p50_ms, 2)} ms"
            for p in result.inprocess
        ),
        *(
            f"  served dlpack={'on ' if p.dlpack else 'off'} {p.users_per_request:>3} u/req "
            f"x {p.concurrency:>3}: {_f(p.users_per_s):>12} users/s p50 {_f(p.p50_ms, 2)} "
            f"p99 {_f(p.p99_ms, 2)} ms failed {p.failed}"
            for p in result.served
        ),
        *(f"  SKIPPED {s[:300]}" for s in result.skipped),
        f"  targets: {result.targets}",
    ]
    return "\n".join(rows)


def environment_notes() -> list[str]:
    """What the run's environment says about itself (recorded with the results)."""
    keys = ("DYNEMB_MINILM_DIR", "DYNEMB_CACHE", "CUDA_VISIBLE_DEVICES")
    return [f"{k}={os.environ[k]}" for k in keys if os.environ.get(k)]
