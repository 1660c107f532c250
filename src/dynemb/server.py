"""Start the tritonserver binary that nvidia-pytriton bundles, on our own repository.

What the environment needs (measured on tritonserver 2.51 from nvidia-pytriton 0.7.0, see
the README's serving notes): a copy of the server tree with the backend stub that matches
this interpreter; the venv's bin first on PATH (the stub finds its Python through
`python3`); the base interpreter's LIBDIR first on LD_LIBRARY_PATH, before
nvidia_pytriton.libs, so the stub loads the right libpython (else `ssl` fails).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import tritonclient.grpc as grpcclient

from dynemb import control
from dynemb.ensembles import MODELS
from dynemb.errors import DynembError
from dynemb.paths import MODEL_REPOSITORY, cache_dir, unfinished_build

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


class ServerError(DynembError, RuntimeError):
    """The server could not start, died, or did not get ready in time."""


@dataclass
class ServerConfig:
    repository: Path = MODEL_REPOSITORY
    host: str = LOOPBACK
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    log_file: Path | None = None  # default: <cache>/logs/tritonserver-<grpc_port>.log
    models: tuple[str, ...] = MODELS
    startup_timeout_s: float = 300.0
    exit_timeout_s: int = 15
    control_token: str | None = None  # None: model control unprotected (loopback only)
    # GPU 0's CUDA memory pool (MiB) through which the Python backend hands GPU tensors
    # between stages (the gpu variant); 0: Triton's default (64 MiB), no flag.
    cuda_memory_pool_mb: int = 0
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class PortProblem(NamedTuple):
    text: str  # "gRPC port 8001 already in use (another server still running?)"
    in_use: bool  # another process holds the port (vs. a port or host that cannot be)


def port_problems(config: ServerConfig) -> list[PortProblem]:
    """What keeps the server from binding its ports, each bound as tritonserver binds it
    (address reuse on: a port whose last server just stopped is free); said before the
    server starts, which otherwise loads every model and then dies with the reason in its
    log. A host that is not this machine's, or that does not resolve, is one problem (it
    was said as every port in use)."""
    problems = []
    ports = (("gRPC", config.grpc_port), ("HTTP", config.http_port))
    for name, port in (*ports, ("metrics", config.metrics_port)):
        if not 1 <= port <= 65535:
            problems.append(PortProblem(f"{name} port {port} is not in 1-65535", False))
            continue
        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((config.host, port))
            except socket.gaierror as exc:
                return [PortProblem(f"cannot resolve the host ({exc.strerror})", False)]
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    return [PortProblem("not an address of this machine (--host)", False)]
                in_use = exc.errno == errno.EADDRINUSE
                said = " already in use (another server still running?)" if in_use else ""
                text = f"{name} port {port}{said or f': {exc.strerror}'}"
                problems.append(PortProblem(text, in_use))
    return problems


def pytriton_dir() -> Path:
    """Where nvidia-pytriton's package lies, found without importing it (its `__init__`
    imports its own client's dependencies; only its server tree is used here)."""
    found = importlib.util.find_spec("pytriton")
    if found is None or not found.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: it bundles tritonserver")
    return Path(next(iter(found.submodule_search_locations)))


def server_tree() -> Path:
    """A copy of the bundled server tree with this interpreter's stub in backends/python."""
    source = pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton ships no backend stub for Python {version}")
    target = cache_dir() / f"tritonserver-py{version}"
    marker = target / ".complete"
    if not marker.exists():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy2(stub, target / "backends" / "python" / stub.name)
        marker.touch()
    return target


# One intra-op thread per instance; nothing may reach a model hub (also in deploy/k8s).
STAGE_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUTF8": "1",
}


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    libs = pytriton_dir().parent / "nvidia_pytriton.libs"
    python_libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    ld = [python_libdir, str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
    env.update(STAGE_ENV)
    env.update(extra or {})
    return env


def serving_flags(c: ServerConfig, repository: str) -> list[str]:
    """The flags every dynemb tritonserver runs with, here and in deploy/k8s (which passes
    its container's paths and `$(DYNEMB_CONTROL_TOKEN)` for Kubernetes to fill in)."""
    return [
        f"--model-repository={repository}",
        "--model-control-mode=explicit",
        *(f"--load-model={name}" for name in c.models),
        "--strict-readiness=true",
        f"--exit-timeout-secs={c.exit_timeout_s}",
        f"--grpc-address={c.host}",
        f"--grpc-port={c.grpc_port}",
        f"--http-address={c.host}",
        f"--http-port={c.http_port}",
        f"--metrics-address={c.host}",
        f"--metrics-port={c.metrics_port}",
        "--log-verbose=0",
        *control.server_args(c.control_token, c.host),
        *(
            (f"--cuda-memory-pool-byte-size=0:{c.cuda_memory_pool_mb * 2**20}",)
            if c.cuda_memory_pool_mb
            else ()
        ),
        *c.extra_args,
    ]


class TritonServer:
    """One tritonserver process (and its stub children, in its own process group)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.process: subprocess.Popen | None = None
        self.log_file = config.log_file or (
            cache_dir() / "logs" / f"tritonserver-{config.grpc_port}.log"
        )

    def command(self) -> list[str]:
        tree = server_tree()
        return [
            str(tree / "bin" / "tritonserver"),
            f"--backend-directory={tree / 'backends'}",
            *serving_flags(self.config, str(self.config.repository.resolve())),
        ]

    def start(self) -> TritonServer:
        if self.process is not None:
            raise ServerError("already started")
        repository = self.config.repository
        unfinished = unfinished_build(repository)
        if unfinished:
            raise ServerError(unfinished)
        missing = [m for m in self.config.models if not (repository / m).is_dir()]
        if missing:  # said here, before tritonserver starts and dies with a stat error
            raise ServerError(
                f"{repository}: not a dynemb model repository (no {', '.join(missing)}); "
                f"build one with `dynemb build --repository {repository}`"
            )
        problems = port_problems(self.config)
        if problems:
            said = f"{self.config.host}: {'; '.join(p.text for p in problems)}"
            if all(p.in_use for p in problems):
                said += ": stop what holds them or choose other ports (--grpc-port, ...)"
            raise ServerError(said)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting tritonserver on %s (log: %s)", self.config.grpc_url, self.log_file)
        with self.log_file.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=server_env(self.config.env),
                start_new_session=True,  # its own process group: stop() reaches the stubs
            )
        return self

    def wait_ready(self, progress: callable | None = None) -> None:
        """Poll until the server and every model are ready; fail fast if the process dies."""
        deadline = time.monotonic() + self.config.startup_timeout_s
        client = grpcclient.InferenceServerClient(self.config.grpc_url)
        pending = list(self.config.models)
        try:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    raise ServerError(f"tritonserver exited during start-up:\n{self.log_tail()}")
                with contextlib.suppress(Exception):  # not listening yet
                    pending = [m for m in pending if not client.is_model_ready(m)]
                    if progress:
                        progress(len(self.config.models) - len(pending), len(self.config.models))
                    if not pending and client.is_server_ready():
                        return
                time.sleep(0.5)
        finally:
            client.close()
        self.stop()
        raise ServerError(
            f"not ready after {self.config.startup_timeout_s:.0f}s: {pending}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_file.exists():
            return ""
        return "\n".join(
            self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def how_it_exited(self) -> str:
        """ "killed by SIGSEGV", "exit status 1", or "running"."""
        code = None if self.process is None else self.process.poll()
        if code is None:
            return "running"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit status {code}"

    def stop(self) -> int | None:
        """SIGTERM, wait for a graceful exit, then SIGKILL whatever is left of the group."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            # SIGTERM to tritonserver alone: it stops taking requests, lets the in-flight
            # ones finish (up to --exit-timeout-secs) and stops its stage processes itself;
            # signalling the whole group would kill the stubs under the in-flight requests.
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=self.config.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not exit in time; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stubs left behind by a hard exit
        code = process.wait()
        log.info("tritonserver stopped (exit code %s)", code)
        return code

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
