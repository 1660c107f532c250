"""Self-healing stages: watch a running tritonserver's stage processes and bring a dead or
hung one back, through the protected repository API, without an operator.

Triton 2.51 neither restarts a stage whose backend stub died nor stops reporting it ready:
every request through it fails with INTERNAL "Stub process ... is not healthy", and a
plain `load_model` of unchanged files is a no-op. What brings it back (measured) is to
unload the stage and load it again; the ensembles that use it are unavailable meanwhile
and return by themselves when it is back (they are loaded again too, to be sure).

The supervisor checks every `interval_s` that each stage has its stub processes, and
every `probe_every_s` sends each stage a tiny request of its own (`Stage.probe_inputs`).
A stage with a missing stub, or whose probe fails as unhealthy or times out twice with no
execution finished meanwhile (`HangWatch`: a probe queued behind big requests is busy,
not hung), is recovered: unload, load, wait until it and the ensembles are ready. While
that runs the server's readiness is false (strict readiness: a model is not ready), so a
load balancer stops sending it traffic; the project's client retries the errors of that
window (dynemb_client.errors.is_transient). Every recovery is logged and counted
(`dynemb_stage_recoveries_total{stage}`, `dynemb_stage_up{stage}`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from dynemb import control, stages
from dynemb.ensembles import ENSEMBLE_NAMES
from dynemb.errors import DynembError
from dynemb.manifest import Manifest
from dynemb.pipeline import latest_version
from dynemb.processes import process_tree

log = logging.getLogger(__name__)

UNHEALTHY = "is not healthy"


@dataclass
class HangWatch:
    """Whether a stage whose probe timed out is hung or busy. A probe queued behind real
    work (a request of 32 users' large images holds the one preprocess instance for 20 s
    and more) times out while the stage keeps finishing executions: busy. Two timeouts in
    a row with no execution finished between their probe rounds: hung."""

    executions: dict[str, int] = field(default_factory=dict)  # at this probe round
    _seen: dict[str, int] = field(default_factory=dict)  # at the round of the last timeout
    _timeouts: dict[str, int] = field(default_factory=dict)

    def answered(self, stage: str) -> None:
        self._timeouts.pop(stage, None)
        self._seen.pop(stage, None)

    def timed_out(self, stage: str) -> bool:
        """Count a timed-out probe of `stage`; whether it now counts as hung."""
        now, before = self.executions.get(stage), self._seen.get(stage)
        if now is not None:
            self._seen[stage] = now
        if now is not None and before is not None and now > before:
            self._timeouts[stage] = 1  # busy since the last timeout: this one starts anew
            return False
        self._timeouts[stage] = self._timeouts.get(stage, 0) + 1
        return self._timeouts[stage] >= 2


@dataclass(frozen=True)
class Recovery:
    stage: str
    reason: str
    detected_at: float  # time.time()
    seconds: float  # detection to the stage and the ensembles ready again
    ok: bool
    error: str | None = None


@dataclass
class SupervisorState:
    recoveries: list[Recovery] = field(default_factory=list)
    probes: int = 0
    probe_failures: int = 0


def stub_counts(server_pid: int) -> dict[str, int]:
    """Running backend stub processes per model, from the process tree."""
    counts: dict[str, int] = {}
    for pid in process_tree(server_pid)[1:]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"triton_python_backend_stub") or len(argv) < 2:
            continue
        model = Path(argv[1].decode(errors="replace")).parents[1].name
        counts[model] = counts.get(model, 0) + 1
    return counts


class StageSupervisor:
    def __init__(
        self,
        server,  # dynemb.server.TritonServer, started and ready
        token: str | None,
        interval_s: float = 0.5,
        probe_every_s: float = 5.0,
        probe_timeout_s: float = 20.0,
        ready_timeout_s: float = 120.0,
        metrics_port: int | None = None,
        lock_timeout_s: float = control.LOCK_WAIT_S,
    ) -> None:
        self.server = server
        self.lock_timeout_s = lock_timeout_s  # waiting for a swap under way
        self.token = token
        self.interval_s = interval_s
        self.probe_every_s = probe_every_s
        self.probe_timeout_s = probe_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.state = SupervisorState()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = grpcclient.InferenceServerClient(server.config.grpc_url)
        self._expected = self._instances()
        self._probes = self._probe_requests()
        self._watch = HangWatch()
        self._metrics = _Metrics(metrics_port, server.config.host) if metrics_port else None

    # --- what is expected -----------------------------------------------------------------

    def _instances(self) -> dict[str, int]:
        out = {}
        for name in stages.NAMES:
            config = self._client.get_model_config(name, as_json=True)["config"]
            out[name] = sum(int(g.get("count", 1)) for g in config.get("instance_group", []))
        return out

    def _probe_requests(self) -> dict[str, list[grpcclient.InferInput]]:
        out = {}
        repository = self.server.config.repository
        for name in stages.NAMES:
            dims = Manifest.load(latest_version(repository / name)).dims
            inputs = []
            for tensor_name, value in stages.get(name).probe_inputs(dims).items():
                tensor = grpcclient.InferInput(
                    tensor_name, list(value.shape), np_to_triton_dtype(value.dtype)
                )
                tensor.set_data_from_numpy(np.asarray(value))
                inputs.append(tensor)
            out[name] = inputs
        return out

    # --- the loop -------------------------------------------------------------------------

    def start(self) -> StageSupervisor:
        self._thread = threading.Thread(target=self._run, name="stage-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop_soon(self) -> None:
        """Tell the loop to stop after what it is doing (`stop` waits for it)."""
        self._stop.set()

    def stop(self) -> None:
        """Stop the loop and free the metrics port (a restarted replica's supervisor binds
        it again)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.ready_timeout_s + 10)
        self._client.close()
        if self._metrics is not None:
            self._metrics.close()

    def _run(self) -> None:
        next_probe = time.monotonic() + self.probe_every_s
        while not self._stop.wait(self.interval_s):
            if not self.server.running():
                return
            try:
                for stage in self.check_processes():
                    self.recover(stage, "a stage process died")
                if time.monotonic() >= next_probe:
                    next_probe = time.monotonic() + self.probe_every_s
                    for stage, reason in self.probe_all():
                        self.recover(stage, reason)
            except Exception:  # the supervisor must outlive any one failed check
                log.exception("stage supervisor check failed")

    def check_processes(self) -> list[str]:
        """Stages with fewer stub processes than instances (checked twice, so that a swap's
        handover between versions is not mistaken for a death)."""
        counts = stub_counts(self.server.process.pid)
        short = [s for s in stages.NAMES if counts.get(s, 0) < self._expected[s]]
        if not short:
            return []
        time.sleep(self.interval_s)
        counts = stub_counts(self.server.process.pid)
        return [s for s in short if counts.get(s, 0) < self._expected[s]]

    def probe_all(self) -> list[tuple[str, str]]:
        failed = []
        self._watch.executions = self._execution_counts()
        for stage in stages.NAMES:
            reason = self.probe(stage)
            if reason is not None:
                failed.append((stage, reason))
        return failed

    def probe(self, stage: str) -> str | None:
        """None when the stage answers its probe; else why it needs recovering."""
        self.state.probes += 1
        try:
            self._client.infer(stage, self._probes[stage], client_timeout=self.probe_timeout_s)
        except InferenceServerException as exc:
            message = exc.message() or str(exc)
            timed_out = "DEADLINE_EXCEEDED" in str(exc.status())
            self.state.probe_failures += 1
            if UNHEALTHY in message:
                return f"probe: {message}"
            if timed_out and self._watch.timed_out(stage):
                return (
                    f"probe timed out twice ({self.probe_timeout_s:.0f} s each), "
                    "no execution finished meanwhile"
                )
            log.warning("probe of %s failed: %s", stage, message)
            return None
        self._watch.answered(stage)
        if self._metrics:
            self._metrics.up(stage, True)
        return None

    def _execution_counts(self) -> dict[str, int]:
        """Executions each stage has finished (Triton's statistics, all versions); empty
        when the server cannot say (then a second timeout counts as a hang, as before)."""
        try:
            stats = self._client.get_inference_statistics(
                as_json=True, client_timeout=self.probe_timeout_s
            )
        except InferenceServerException:
            return {}
        counts: dict[str, int] = {}
        for model in stats.get("model_stats", []):
            name = model.get("name", "")
            counts[name] = counts.get(name, 0) + int(model.get("execution_count", 0))
        return counts

    # --- recovery -------------------------------------------------------------------------

    def recover(self, stage: str, reason: str) -> Recovery | None:
        """Unload and load `stage` again, under the repository's control lock (a swap or a
        rollback under way finishes first). None when, by the time the lock is held, the
        stage has its processes and answers its probe: a swap's reload, or its handover
        between versions, was what the check saw."""
        detected = time.time()
        started = time.monotonic()
        try:
            with control.repository_lock(
                self.server.config.repository,
                f"recovery of {stage}",
                self.lock_timeout_s,
                lambda message: log.warning("%s", message),
            ):
                if time.monotonic() - started > self.interval_s and self._healthy(stage):
                    log.warning(
                        "%s is healthy again after waiting for the lock (%s)", stage, reason
                    )
                    return None
                return self._recover(stage, reason, detected, started)
        except control.ControlError as exc:  # a swap that holds on: try again next round
            log.error("not recovering %s yet: %s", stage, exc)
            return None

    def _healthy(self, stage: str) -> bool:
        """Whether `stage` has all its processes and answers its probe now."""
        counts = stub_counts(self.server.process.pid)
        return counts.get(stage, 0) >= self._expected[stage] and self.probe(stage) is None

    def _recover(self, stage: str, reason: str, detected: float, started: float) -> Recovery:
        log.error("recovering %s: %s", stage, reason)
        if self._metrics:
            self._metrics.up(stage, False)
        headers = control.headers(self.token)
        error = None
        try:
            # Each call bounded: a stage whose start hangs must not stop the supervisor.
            bound = self.ready_timeout_s
            self._client.unload_model(stage, headers=headers, client_timeout=bound)
            self._client.load_model(stage, headers=headers, client_timeout=bound)
            self._wait_ready([stage])
            for ensemble in ENSEMBLE_NAMES:
                if not self._client.is_model_ready(ensemble, client_timeout=self.probe_timeout_s):
                    self._client.load_model(ensemble, headers=headers, client_timeout=bound)
            self._wait_ready(list(ENSEMBLE_NAMES))
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.exception("recovering %s failed", stage)
        recovery = Recovery(
            stage, reason, detected, time.monotonic() - started, error is None, error
        )
        self.state.recoveries.append(recovery)
        self._watch.answered(stage)
        if self._metrics:
            self._metrics.recovered(stage, error is None)
        log.warning("%s back after %.1f s (%s)", stage, recovery.seconds, reason)
        return recovery

    def _wait_ready(self, models: list[str]) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            ask = self._client.is_model_ready
            if all(ask(m, client_timeout=self.probe_timeout_s) for m in models):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{models} not ready after {self.ready_timeout_s:.0f} s")


class _Metrics:
    """The supervisor's own Prometheus endpoint (the server's port holds Triton's)."""

    def __init__(self, port: int, host: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        self.recoveries = Counter(
            "dynemb_stage_recoveries",
            "Stage processes brought back by the supervisor",
            ["stage", "outcome"],
            registry=self.registry,
        )
        self.stage_up = Gauge(
            "dynemb_stage_up",
            "1 while a stage answers its probe, 0 while it is being recovered",
            ["stage"],
            registry=self.registry,
        )
        for name in stages.NAMES:
            self.stage_up.labels(name).set(1)
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:  # the port is taken: a one-line error, not a traceback
            raise DynembError(
                f"the supervisor's metrics port {host}:{port} cannot be used ({exc}); "
                "pass another --supervisor-port"
            ) from exc

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def up(self, stage: str, value: bool) -> None:
        self.stage_up.labels(stage).set(1 if value else 0)

    def recovered(self, stage: str, ok: bool) -> None:
        self.recoveries.labels(stage, "ok" if ok else "failed").inc()
        self.up(stage, ok)
