"""`dynemb swap STAGE ARTIFACT --url A --url B --url C`: one replica at a time.

The replicas read one model repository (one host, or one shared volume). The candidate is
checked and its drift probed once, installed once as version N+1 and loaded on the first
replica with the single-server guards (`Swapper.swap`); then each further replica loads
it and must answer the probes as the candidate did. A replica that fails (unreachable,
not ready in time, a wrong answer, Ctrl-C) stops the roll: N+1 is removed and every
replica that had loaded it (and the failed one, if it answers) loads N again. A replica
down at that moment serves N when it comes back, because N is the newest on disk.

Each replica switches one stage between two versions, and Triton switches a model
between versions without failing a request, so every response comes from one version
of the stage: N before its replica's switch, N+1 after it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dynemb import control
from dynemb.errors import UsageError
from dynemb.manifest import DriftReport
from dynemb.swap.drift import DriftThresholds
from dynemb.swap.swapper import SwapFailedError, Swapper, installed_versions

log = logging.getLogger(__name__)


@dataclass
class RollResult:
    stage: str
    old_version: int
    new_version: int
    drift: DriftReport | None
    seconds: float
    switched: list[tuple[str, float]] = field(default_factory=list)  # (url, seconds), in order


class RollingSwapper:
    def __init__(
        self,
        repository: Path,
        urls: Sequence[str],
        token: str | None = None,
        thresholds: DriftThresholds | None = None,
        ready_timeout_s: float = 120.0,
    ) -> None:
        if not urls:
            raise UsageError("no replica urls to swap")
        if len(set(urls)) != len(urls):
            raise UsageError(f"each replica url once, got {list(urls)}")
        self.repository = repository
        self.swappers = [Swapper(repository, u, token, thresholds, ready_timeout_s) for u in urls]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.swappers]

    def swap(
        self,
        stage: str,
        artifact: Path,
        accept_drift: bool = False,
        progress: Callable[[str], None] = log.info,
        note: str = "",
    ) -> RollResult:
        """Swap `stage` on every replica in turn; all or none end on the new version."""
        with control.repository_lock(
            self.repository, f"rolling swap of {stage}", self.swappers[0].lock_timeout_s, progress
        ):
            return self._swap(stage, artifact, accept_drift, progress, note)

    def _swap(
        self,
        stage: str,
        artifact: Path,
        accept_drift: bool,
        progress: Callable[[str], None],
        note: str,
    ) -> RollResult:
        started = time.monotonic()
        old = installed_versions(self.repository, stage)[-1]
        for swapper in self.swappers:  # refuse before touching anything
            swapper.require_serving(stage, old)
        first, *rest = self.swappers
        progress(f"{first.url}: swapping {stage}")
        result = first.swap(
            stage, artifact, accept_drift=accept_drift, note=note, progress=progress
        )
        switched = [(first.url, result.seconds)]
        new = result.new_version
        current = first
        try:
            for current in rest:
                progress(f"{current.url}: loading {stage} v{new}")
                at = time.monotonic()
                current.activate(stage, new, result.expected)
                switched.append((current.url, time.monotonic() - at))
                progress(f"{current.url}: {stage} v{new} serving")
        except BaseException as exc:  # Ctrl-C too: no replica is left on N+1
            done = [s for s in self.swappers if s.url in dict(switched)]
            # Every replica goes back, not only those switched: one restarted (or reloaded
            # by its supervisor) during the roll loaded N+1, the newest on disk, before
            # its turn. Reloading N where it serves N changes nothing.
            self._roll_back(stage, old, new, self.swappers)
            if not isinstance(exc, Exception):
                raise  # Ctrl-C stays Ctrl-C, after the roll back
            where = ", ".join(s.url for s in done)
            raise SwapFailedError(
                f"{stage} v{new} failed on {current.url} ({exc!r}); rolled back on {where}: "
                f"every replica serves v{old}"
            ) from exc
        return RollResult(stage, old, new, result.drift, time.monotonic() - started, switched)

    def rollback(
        self, stage: str, to: int | None = None, progress: Callable[[str], None] = log.info
    ) -> RollResult:
        """Serve an earlier version (default: the serving one's parent) again on every
        replica, rolled like a swap (a copy of it installed as the newest version)."""
        with control.repository_lock(
            self.repository, f"rollback of {stage}", self.swappers[0].lock_timeout_s, progress
        ):
            source = self.swappers[0].rollback_source(stage, to)
            return self.swap(
                stage,
                source,
                accept_drift=True,
                progress=progress,
                note=f"rollback to v{source.name}",
            )

    def _roll_back(self, stage: str, old: int, new: int, swappers: list[Swapper]) -> None:
        shutil.rmtree(self.repository / stage / str(new), ignore_errors=True)
        for swapper in swappers:
            try:
                swapper.reload(stage, old)
            except Exception:  # down: it loads v{old}, the newest on disk, when it is back
                log.exception("rolling back %s on %s", stage, swapper.url)
