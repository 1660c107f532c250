"""`dynemb bench-faults`: what the server does when things go wrong, measured.

On a copy of a built repository, served with the stage supervisor, under closed-loop
`recommend` clients that use the project's client and its default retry policy:

- a stage process killed (SIGKILL), for each of a cheap and the heaviest stage: time until
  the stage and the ensembles serve again, calls that failed (default client), errors a
  raw tritonclient without retries saw meanwhile, whether readiness said not ready;
- the server restarted (SIGTERM, then started again on the same ports): shutdown and
  start-up seconds, calls that failed;
- fuzzing: over a thousand malformed requests across all nine models, each sent beside
  two good ones: good requests failed, bad ones answered INVALID_ARGUMENT naming the
  tensor, server crashes and stage recoveries.

Results: benchmarks/results/faults.md and faults.json.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from dynemb.bench.context import RunContext, collect_context, context_markdown
from dynemb.bench.fuzz import Ranges
from dynemb.data.synthetic import draw_item_image
from dynemb.ensembles import ENSEMBLE_SPECS, MODELS, STAGE_SPECS
from dynemb.pipeline import Pipeline
from dynemb.processes import process_tree
from dynemb.server import ServerConfig, TritonServer, free_port
from dynemb.sessions.spec import session_spec
from dynemb.specs import TensorSpec
from dynemb.supervisor import StageSupervisor
from dynemb_client import Event, InterestClient, build_inputs
from dynemb_client import contract as wire

log = logging.getLogger(__name__)
T0 = 1_700_000_000.0


# --- load with the default client, and readiness, sampled ------------------------------


def histories() -> list[list[Event]]:
    rng = random.Random(7)
    return [
        [
            Event(
                T0 + 900 * i,
                f"Azure ring lamp #{rng.randrange(60)}",
                draw_item_image(i % 6, rng, 32) if i % 3 else None,
                [f"category:c{i % 6}", "action:view"],
            )
            for i in range(n)
        ]
        for n in (4, 12, 30)
    ]


@dataclass
class Load:
    """Closed-loop `recommend` clients (the project's client, its default retry policy),
    a raw tritonclient without retries, and a readiness sampler; bounded in time."""

    url: str
    clients: int = 4
    max_seconds: float = 120.0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    raw_errors: Counter = field(default_factory=Counter)  # status -> count, no retries
    readiness: list[tuple[float, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(self.clients)
        ]
        self._threads += [
            threading.Thread(target=self._sample, daemon=True),
            threading.Thread(target=self._raw, daemon=True),
        ]

    def _client(self, index: int) -> None:
        history = histories()[index % 3]
        deadline = time.monotonic() + self.max_seconds
        with InterestClient(self.url, timeout_s=30) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    client.recommend(history, k=5)
                except Exception as exc:  # counted: the target is none
                    with self._lock:
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    with self._lock:
                        self.ok += 1

    def _raw(self) -> None:
        x = build_inputs(histories()[:1], [None], 50, 8, top_k=5)
        inputs = infer_inputs(x)
        client = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                client.infer("recommend", inputs, client_timeout=30)
            except InferenceServerException as exc:
                with self._lock:
                    self.raw_errors[str(exc.status()).removeprefix("StatusCode.")] += 1
                time.sleep(0.05)

    def _sample(self) -> None:
        admin = grpcclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                ready = admin.is_server_ready(client_timeout=2)
            except Exception:
                ready = False
            self.readiness.append((time.time(), ready))
            time.sleep(0.1)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def infer_inputs(x: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, value in x.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def send(client: grpcclient.InferenceServerClient, model: str, x: dict[str, np.ndarray]):
    """The result of one request, or the error it got."""
    try:
        return client.infer(model, infer_inputs(x), client_timeout=60)
    except InferenceServerException as exc:
        return exc


def stub_pid(server: TritonServer, stage: str) -> int:
    for pid in process_tree(server.process.pid)[1:]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        if argv[0].endswith(b"triton_python_backend_stub") and f"/{stage}/".encode() in argv[1]:
            return pid
    raise RuntimeError(f"no stub process for {stage}")


# --- fuzzing targets ---------------------------------------------------------------------


@dataclass
class FuzzTarget:
    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[str, ...]
    good: list[dict[str, np.ndarray]]  # three requests of two users each
    ranges: Ranges


def fuzz_targets(pipeline: Pipeline, repository: Path) -> dict[str, FuzzTarget]:
    """Good requests for every model: the wire tensors of six users with images for the
    ensembles and preprocess, what the pipeline computes from them for the other stages."""
    rng = random.Random(3)
    users = [
        [
            Event(
                T0 + 600 * i + u,
                f"{rng.choice(['red', 'blue'])} lamp {rng.randrange(9)}",
                draw_item_image(i % 3, random.Random(i), 32) if i % 2 else None,
                [f"category:c{i % 4}", "rating:4"],
            )
            for i in range(3 + 4 * u)
        ]
        for u in range(6)
    ]
    manifests = {name: runner.manifest for name, runner in pipeline.runners.items()}
    dims = manifests["preprocess"].dims
    x = build_inputs(users, [None] * 6, dims.max_events, dims.max_labels, top_k=5)
    tensors = pipeline.run(x, "recommend")
    ranges = Ranges.of(
        vocab_size=manifests["text_rnn"].hparams.vocab_size,
        n_labels=manifests["label_mlp"].hparams.n_labels,
        max_tokens=dims.max_tokens,
        max_events=dims.max_events,
        max_k=dims.max_top_k,
    )
    specs = {**STAGE_SPECS, **ENSEMBLE_SPECS, wire.SESSION: session_spec(dims)}
    # The session model: each good request starts its own session from its history.
    tensors[wire.SESSION_ID] = np.array([[f"fuzz-{u}".encode()] for u in range(6)], dtype=object)
    tensors[wire.SESSION_OP] = np.full((6, 1), wire.OP_START, dtype=np.int32)
    out = {}
    for model in MODELS:
        spec = specs[model]
        good = [{t.name: tensors[t.name][i : i + 2] for t in spec.inputs} for i in (0, 2, 4)]
        outputs = tuple(t.name for t in spec.outputs)
        out[model] = FuzzTarget(model, spec.inputs, outputs, good, ranges)
    return out


# --- the benchmark -----------------------------------------------------------------------


@dataclass
class CrashResult:
    stage: str
    back_after_s: float  # kill to the stage and ensembles serving again
    recovery_s: float  # the supervisor's unload + load
    ok: bool
    calls_ok: int
    calls_failed: int  # with the default client
    raw_errors: dict[str, int]  # what a raw tritonclient without retries saw
    not_ready_seen: bool


@dataclass
class RestartResult:
    shutdown_s: float
    startup_s: float
    calls_ok: int
    calls_failed: int
    raw_errors: dict[str, int]


@dataclass
class FuzzResult:
    malformed: int
    refused_invalid_argument: int
    refused_naming_the_tensor: int
    other_answers: list[str]  # anything but INVALID_ARGUMENT naming the tensor (first few)
    good: int
    good_failed: int
    by_model: dict[str, int]
    by_kind: dict[str, int]
    server_alive: bool
    stage_recoveries: int


@dataclass
class FaultsResult:
    context: RunContext
    crashes: list[CrashResult]
    restart: RestartResult
    fuzz: FuzzResult


def bench_faults(
    repository: Path,
    out_dir: Path,
    work_dir: Path,
    fuzz_per_model: int = 150,
    say: Callable[[str], None] = log.info,
) -> FaultsResult:
    context = collect_context(data="synthetic histories with images (dynemb.data.synthetic)")
    copy = work_dir / "faults-repository"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(repository, copy)
    config = ServerConfig(
        copy,
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=work_dir / "tritonserver-faults.log",
        startup_timeout_s=240,
        exit_timeout_s=10,
    )
    server = TritonServer(config)
    server.start()
    server.wait_ready()
    supervisor = StageSupervisor(server, token=None, probe_every_s=2.0).start()
    try:
        crashes = []
        for stage in ("text_rnn", "llm_encoder"):
            say(f"crash: SIGKILL of {stage}'s process under load")
            crashes.append(crash(server, supervisor, stage))
        say(f"fuzz: {fuzz_per_model} malformed requests per model, with good neighbours")
        fuzz = fuzz_run(server, supervisor, copy, fuzz_per_model)
        supervisor.stop()
        say("restart: SIGTERM, then start again on the same ports, under load")
        restart, server = restart_run(server, config)
    finally:
        supervisor.stop()
        server.stop()
    context.finish()
    result = FaultsResult(context, crashes, restart, fuzz)
    write(result, out_dir)
    return result


def crash(server: TritonServer, supervisor: StageSupervisor, stage: str) -> CrashResult:
    before = len(supervisor.state.recoveries)
    with Load(server.config.grpc_url) as load:
        time.sleep(3)
        killed = time.time()
        os.kill(stub_pid(server, stage), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while len(supervisor.state.recoveries) == before and time.monotonic() < deadline:
            time.sleep(0.1)
        done = supervisor.state.recoveries[before:]
        recovery = done[-1] if done else None
        time.sleep(3)
    back = recovery.detected_at + recovery.seconds if recovery else float("inf")
    window = [ready for t, ready in load.readiness if killed < t < back]
    return CrashResult(
        stage=stage,
        back_after_s=round(back - killed, 2),
        recovery_s=round(recovery.seconds, 2) if recovery else float("inf"),
        ok=bool(recovery and recovery.ok),
        calls_ok=load.ok,
        calls_failed=len(load.failures),
        raw_errors=dict(load.raw_errors),
        not_ready_seen=not all(window) if window else False,
    )


def restart_run(server: TritonServer, config: ServerConfig) -> tuple[RestartResult, TritonServer]:
    with Load(config.grpc_url) as load:
        time.sleep(3)
        t0 = time.monotonic()
        server.stop()
        shutdown = time.monotonic() - t0
        t1 = time.monotonic()
        server = TritonServer(config)
        server.start()
        server.wait_ready()
        startup = time.monotonic() - t1
        time.sleep(3)
    return (
        RestartResult(
            round(shutdown, 2),
            round(startup, 2),
            load.ok,
            len(load.failures),
            dict(load.raw_errors),
        ),
        server,
    )


def fuzz_run(
    server: TritonServer, supervisor: StageSupervisor, repository: Path, per_model: int
) -> FuzzResult:
    targets = fuzz_targets(Pipeline.from_repository(repository), repository)
    client = grpcclient.InferenceServerClient(server.config.grpc_url)
    pool = ThreadPoolExecutor(3)
    counts = Counter()
    kinds: Counter = Counter()
    models: Counter = Counter()
    other: list[str] = []
    recoveries_before = len(supervisor.state.recoveries)
    for model, target in targets.items():
        fuzz_model(model, target, per_model, client, pool, counts, kinds, models, other)
    pool.shutdown()
    return FuzzResult(
        malformed=counts["malformed"],
        refused_invalid_argument=counts["invalid"],
        refused_naming_the_tensor=counts["named"],
        other_answers=other,
        good=counts["good"],
        good_failed=counts["good_failed"],
        by_model=dict(models),
        by_kind=dict(kinds),
        server_alive=server.running(),
        stage_recoveries=len(supervisor.state.recoveries) - recoveries_before,
    )


def fuzz_model(model, target, per_model, client, pool, counts, kinds, models, other) -> None:
    """Hypothesis draws `per_model` malformed requests of `model`; each goes out beside two
    good ones, and the answers are counted."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dynemb.bench.fuzz import malformed

    @settings(
        max_examples=per_model,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def one(data):
        bad = data.draw(malformed(model, target.inputs, target.good[2], target.ranges))
        futures = [
            pool.submit(send, client, model, request)
            for request in (target.good[0], bad.inputs, target.good[1])
        ]
        first, refused, second = (f.result() for f in futures)
        counts["malformed"] += 1
        models[model] += 1
        kinds[bad.how] += 1
        counts["good"] += 2
        counts["good_failed"] += sum(isinstance(a, Exception) for a in (first, second))
        invalid = isinstance(refused, InferenceServerException) and (
            "INVALID_ARGUMENT" in str(refused.status())
        )
        if invalid:
            counts["invalid"] += 1
            if bad.field in (refused.message() or ""):
                counts["named"] += 1
                return
        if len(other) < 10:
            other.append(f"{model} {bad.field} {bad.how}: {refused}")

    one()


def write(result: FaultsResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = asdict(result)
    payload["context"] = result.context.as_dict()
    (out_dir / "faults.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    (out_dir / "faults.md").write_text(render_markdown(result), encoding="utf-8")


def render_markdown(result: FaultsResult) -> str:
    f, r = result.fuzz, result.restart
    lines = [
        "# Faults: crashed stages, a restart, malformed requests",
        "",
        __doc__.split("\n\n")[1].replace("\n", " "),
        "",
        "## Stage crash under load (4 clients, default retry policy)",
        "",
        "| stage | back after (s) | supervisor's reload (s) | calls ok | calls failed | "
        "raw client errors (no retries) | readiness false seen |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for c in result.crashes:
        lines.append(
            f"| {c.stage} | {c.back_after_s} | {c.recovery_s} | {c.calls_ok} | "
            f"{c.calls_failed} | {c.raw_errors or '–'} | {'yes' if c.not_ready_seen else 'no'} |"
        )
    lines += [
        "",
        "## Server restart under load (SIGTERM, start again on the same ports)",
        "",
        f"Shutdown {r.shutdown_s} s, start-up to ready {r.startup_s} s; calls with the "
        f"default client: {r.calls_ok} ok, **{r.calls_failed} failed**; a raw client without "
        f"retries saw {r.raw_errors or 'no errors'}.",
        "",
        "## Fuzzing (each malformed request beside two good ones)",
        "",
        f"- malformed requests: **{f.malformed}** across {len(f.by_model)} models "
        f"({', '.join(f'{m} {n}' for m, n in f.by_model.items())})",
        f"- answered INVALID_ARGUMENT: {f.refused_invalid_argument}; naming the broken "
        f"tensor: **{f.refused_naming_the_tensor}** "
        f"({100 * f.refused_naming_the_tensor / max(f.malformed, 1):.1f}%)",
        f"- good neighbours: {f.good}, failed: **{f.good_failed}**",
        f"- server alive after: {f.server_alive}; stage recoveries during the fuzzing: "
        f"{f.stage_recoveries}",
        f"- ways of breaking a request: {dict(sorted(f.by_kind.items()))}",
    ]
    if f.other_answers:
        lines += ["- other answers:", *(f"  - `{a}`" for a in f.other_answers)]
    lines += ["", "## Context", "", context_markdown(result.context)]
    return "\n".join(lines) + "\n"
