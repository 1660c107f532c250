"""Several tritonservers on one repository and one host, each on its own loopback ports:
what tests, demos and benchmarks of client-side balancing and failover run against.

A real deployment runs one server per pod instead (deploy/k8s); the client is the same
(InterestClient(urls=[...]) balances, fails over and probes back, dynemb_client.transport).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dynemb.server import ServerConfig, ServerError, TritonServer, free_port

log = logging.getLogger(__name__)

PORT_STEP = 100  # replica i listens on the base ports + i * PORT_STEP


@dataclasses.dataclass
class RestartBudget:
    """Whether a server that exited by itself is started again: yes, unless this is its
    `limit`-th exit within `window_s` (a crash loop, which whoever runs `dynemb serve`
    should see as its exit). tritonserver 2.51 dies of SIGSEGV when a client cancels a
    call to an ensemble in flight (a client deadline, a closed channel, a killed client:
    triton-inference-server/server#7368, fixed after the 2.51 that nvidia-pytriton ships),
    so any client can take a server down; `dynemb serve` brings it back."""

    limit: int = 5
    window_s: float = 600.0
    exits: deque[float] = dataclasses.field(default_factory=deque)

    def allows(self, now: float) -> bool:
        """Count an exit at `now` (monotonic seconds); True if the server may start again."""
        self.exits.append(now)
        while now - self.exits[0] > self.window_s:
            self.exits.popleft()
        return len(self.exits) < self.limit


def stepped_configs(base: ServerConfig, replicas: int, step: int = PORT_STEP) -> list[ServerConfig]:
    """`replicas` copies of `base`, replica i on each base port + i * step, each its own log."""
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    base_ports = (base.grpc_port, base.http_port, base.metrics_port)
    every = [p + i * step for i in range(replicas) for p in base_ports]
    if len(set(every)) < len(every):
        raise ValueError(
            f"the ports {list(base_ports)} + i * {step} collide across {replicas} replicas"
        )
    if max(every) > 65535:
        raise ValueError(f"replica {replicas - 1} would listen on port {max(every)} > 65535")
    configs = []
    for i in range(replicas):
        log_file = base.log_file
        if log_file is not None and replicas > 1:
            log_file = log_file.with_name(f"{log_file.stem}-{i}{log_file.suffix}")
        configs.append(
            dataclasses.replace(
                base,
                grpc_port=base.grpc_port + i * step,
                http_port=base.http_port + i * step,
                metrics_port=base.metrics_port + i * step,
                log_file=log_file,
            )
        )
    return configs


def free_configs(base: ServerConfig, replicas: int, log_dir: Path) -> list[ServerConfig]:
    """`replicas` copies of `base` on free loopback ports, logs under `log_dir`."""
    return [
        dataclasses.replace(
            base,
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            log_file=log_dir / f"tritonserver-{i}.log",
        )
        for i in range(replicas)
    ]


class Replicas:
    """N TritonServers started together, stopped together (also on a failed start)."""

    def __init__(self, configs: Sequence[ServerConfig]) -> None:
        if not configs:
            raise ValueError("no replicas to run")
        self.configs = list(configs)
        self.servers = [TritonServer(c) for c in self.configs]

    @property
    def urls(self) -> list[str]:
        return [c.grpc_url for c in self.configs]

    def start(self, progress: Callable[[int, int], None] | None = None) -> Replicas:
        """Start every server, then wait until all are ready (they load side by side)."""
        try:
            for server in self.servers:
                server.start()
            total = len(self.servers) * len(self.configs[0].models)
            done = [0] * len(self.servers)

            def report(i: int) -> Callable[[int, int], None]:
                def update(loaded: int, _: int) -> None:
                    done[i] = loaded
                    if progress:
                        progress(sum(done), total)

                return update

            for i, server in enumerate(self.servers):
                server.wait_ready(report(i))
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> list[bool]:
        return [server.running() for server in self.servers]

    def kill(self, i: int) -> None:
        """SIGKILL replica i with its stage processes (a lost machine, not a clean stop)."""
        process = self.servers[i].process
        if process is None:
            raise ServerError(f"replica {i} is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        self.servers[i].process = None

    def restart(self, i: int) -> TritonServer:
        """Start replica i again on its ports and wait until it is ready."""
        self.servers[i].stop()
        self.servers[i] = TritonServer(self.configs[i])
        self.servers[i].start().wait_ready()
        return self.servers[i]

    def stop(self) -> list[int | None]:
        """Stop every server (side by side: each may wait for its in-flight requests)."""
        with ThreadPoolExecutor(max_workers=len(self.servers)) as pool:
            return list(pool.map(lambda server: server.stop(), self.servers))

    def __enter__(self) -> Replicas:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
