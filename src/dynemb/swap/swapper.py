"""`dynemb swap`, `dynemb rollback`, `dynemb versions`.

A swap never edits a served version: it writes the candidate as version N+1 and asks the
server to load the stage (version policy: latest 1). Triton loads N+1 beside N, switches,
then unloads N, and reloads the ensembles that use the stage; no request fails. Paths that
would take an ensemble down (unloading a stage, a partial config override) are never used.
Any failure after N+1 is written removes it and reloads, so the server serves N again.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dynemb import control, stages
from dynemb.ensembles import ENSEMBLE_NAMES, ENSEMBLE_SPECS, RECOMMEND_STEPS
from dynemb.errors import DynembError
from dynemb.manifest import ADAPTER, MANIFEST, DriftReport, Manifest, ManifestError
from dynemb.pipeline import Pipeline, latest_version, versions_of
from dynemb.stages import Runner, UnknownStageError, load_runner
from dynemb.swap.drift import DriftThresholds, measure, probe_inputs
from dynemb_client import contract as wire
from dynemb_client.contract import RECOMMEND
from dynemb_client.transport import check_url

log = logging.getLogger(__name__)
PARITY_ATOL = 1e-4


class SwapRefusedError(DynembError, RuntimeError):
    """The candidate was not installed; the server was not touched."""


def installed_versions(repository: Path, stage: str) -> list[int]:
    """The version numbers of `stage` in `repository`, oldest first; refused for a name
    that is no stage (the ensembles and the session model are not swapped) and for a
    stage with none (an unfinished build), before a swap or rollback touches anything."""
    try:
        stages.get(stage)
    except UnknownStageError as exc:
        raise SwapRefusedError(str(exc)) from exc
    try:
        found = versions_of(repository / stage)
    except DynembError as exc:
        raise SwapRefusedError(str(exc)) from exc
    if not found:
        raise SwapRefusedError(f"{repository / stage}: no versions; run `dynemb build`")
    return found


class SwapFailedError(DynembError, RuntimeError):
    """The candidate was installed but failed on the server; the previous version is back."""


@dataclass
class SwapResult:
    stage: str
    old_version: int
    new_version: int
    drift: DriftReport
    seconds: float
    notes: list[str] = field(default_factory=list)
    # What the server must answer for the probes with the new version (checked on it).
    expected: dict[str, np.ndarray] | None = field(default=None, repr=False)


def check_candidate(stage: str, artifact: Path) -> Manifest:
    """Signature and integrity, before anything is loaded."""
    try:
        found = stages.get(stage)
    except UnknownStageError as exc:
        raise SwapRefusedError(str(exc)) from exc
    if not (artifact / MANIFEST).exists():
        raise SwapRefusedError(f"{artifact}: no {MANIFEST}; not a stage version directory")
    try:
        manifest = Manifest.load(artifact)
    except ManifestError as exc:
        raise SwapRefusedError(str(exc)) from exc
    if manifest.stage != stage:
        raise SwapRefusedError(f"{artifact} is a {manifest.stage!r} artifact, not {stage!r}")
    expected = found.spec(manifest.dims).signature
    if manifest.signature != expected:
        raise SwapRefusedError(
            f"signature differs from the {stage} spec:\n  candidate {manifest.signature}\n"
            f"  spec      {expected}"
        )
    try:
        manifest.verify(artifact)
    except (OSError, ValueError) as exc:
        raise SwapRefusedError(f"artifact integrity: {exc}") from exc
    return manifest


class Swapper:
    def __init__(
        self,
        repository: Path,
        url: str = "127.0.0.1:8001",
        token: str | None = None,
        thresholds: DriftThresholds | None = None,
        ready_timeout_s: float = 120.0,
        lock_timeout_s: float = control.LOCK_WAIT_S,
    ) -> None:
        self.repository = repository
        self.url = url
        self.token = token
        self.thresholds = thresholds or DriftThresholds()
        self.ready_timeout_s = ready_timeout_s
        self.lock_timeout_s = lock_timeout_s  # waiting for another swap or a recovery
        self.client = grpcclient.InferenceServerClient(check_url(url))
        self._probes: dict | None = None
        self._runners: dict[tuple[Path, bytes], Runner] = {}
        self._baseline_cache: tuple[tuple[int, ...], dict] | None = None

    @property
    def probes(self) -> dict[str, np.ndarray]:
        if self._probes is None:
            self._probes = probe_inputs()
        return self._probes

    def swap(
        self,
        stage: str,
        artifact: Path,
        accept_drift: bool = False,
        precheck: bool = True,
        note: str = "",
        progress: Callable[[str], None] = log.info,
    ) -> SwapResult:
        started = time.monotonic()
        manifest = check_candidate(stage, artifact)
        progress(f"{stage}: signature and sha256 ok")
        # Held from the drift baseline (the versions serving now) to the end: another swap
        # would write the same N+1, a stage recovery would reload the stage under the checks.
        with control.repository_lock(
            self.repository, f"swap of {stage}", self.lock_timeout_s, progress
        ):
            return self._swap(
                stage, artifact, manifest, accept_drift, precheck, note, progress, started
            )

    def _swap(
        self,
        stage: str,
        artifact: Path,
        manifest: Manifest,
        accept_drift: bool,
        precheck: bool,
        note: str,
        progress: Callable[[str], None],
        started: float,
    ) -> SwapResult:
        model_dir = self.repository / stage
        old = installed_versions(self.repository, stage)[-1]
        # The server serves this repository's newest version of the stage (a server of
        # another repository would only show after the ready timeout, with N+1 loaded),
        # asked first: a server that is down is said before the drift probes run.
        self.require_serving(stage, old)
        current = self.current_pipeline()
        try:
            candidate = load_runner(artifact)
        except Exception as exc:
            if precheck:
                raise SwapRefusedError(f"candidate fails to initialize: {exc!r}") from exc
            candidate = None  # only tests skip this, to exercise the server-side refusal
        drift, expected = None, None
        if candidate is not None:
            candidate_pipeline = Pipeline({**current.runners, stage: candidate})
            expected = candidate_pipeline.run(self.probes, RECOMMEND, checks=False)
            drift = measure(self._baseline(current), expected, candidate)
        if drift is not None:
            progress(f"{stage}: drift {drift.as_dict()}")
            problems = drift.problems(self.thresholds)
            if not drift.finite:
                raise SwapRefusedError(f"{stage}: {'; '.join(problems)}")
            if problems and not accept_drift:
                raise SwapRefusedError(
                    f"{stage}: drift out of bounds ({'; '.join(problems)}); "
                    "pass --accept-drift to swap anyway"
                )
        new = self._install(model_dir, artifact, manifest, old, drift, note)
        try:  # from the moment N+1 is on disk: nothing between it and the restore
            progress(f"{stage}: installed as version {new}; loading")
            self.activate(stage, new, expected)
        except BaseException as exc:  # Ctrl-C too: never left half swapped
            try:
                self._restore(model_dir / str(new), stage, old)
            except Exception as failed:
                raise SwapFailedError(
                    f"{stage} v{new} failed on the server ({exc!r}), and loading v{old} again "
                    f"failed too ({failed!r}): v{new} is removed from disk, but the server may "
                    f"still serve it; check with `dynemb versions --url {self.url}`"
                ) from exc
            if not isinstance(exc, Exception):
                raise
            raise SwapFailedError(
                f"{stage} v{new} failed on the server ({exc}); v{old} serves"
            ) from exc
        progress(f"{stage}: version {new} serving")
        return SwapResult(stage, old, new, drift, time.monotonic() - started, expected=expected)

    def activate(
        self, stage: str, version: int, expected: dict[str, np.ndarray] | None = None
    ) -> None:
        """Load `stage` again (the repository's newest, `version`), wait until it and the
        ensembles are ready, and check that the ensembles' answers to the probes say they
        come from `version` and equal `expected`."""
        self.reload(stage, version)
        self._verify(stage, version, expected)

    def require_serving(self, stage: str, version: int) -> None:
        """Refuse unless this server is reachable, serves `stage` v`version` and has every
        ensemble ready."""
        self._require_ready([*ENSEMBLE_NAMES])
        try:
            serving = self.client.is_model_ready(stage, str(version), client_timeout=control.ASK_S)
        except InferenceServerException as exc:
            raise SwapRefusedError(f"cannot reach the server at {self.url}: {exc}") from exc
        if not serving:
            raise SwapRefusedError(f"{self.url} does not serve {stage} v{version}; not swapping")
        try:  # before anything is installed (the load that needs it comes after)
            control.check_access(self.client, self.token)
        except control.ControlError as exc:
            raise SwapRefusedError(f"{exc}; not swapping") from exc

    def reload(self, stage: str, version: int) -> None:
        """Load `stage` again and wait until `version` (the newest on disk: a new one, or
        the old one after the newer directory was removed) and the ensembles are ready."""
        control.load_model(self.client, stage, self.token, timeout_s=self.ready_timeout_s)
        self._wait_ready(stage, version)

    def current_pipeline(self) -> Pipeline:
        """The repository's newest versions; unchanged stages are not loaded again."""
        runners = {}
        for name in RECOMMEND_STEPS:
            directory = latest_version(self.repository / name)
            # A failed swap's directory number is reused: key on the manifest's content too.
            key = (directory, (directory / MANIFEST).read_bytes())
            if key not in self._runners:
                self._runners[key] = load_runner(directory)
            runners[name] = self._runners[key]
        return Pipeline(runners)

    def rollback(self, stage: str, to: int | None = None, **kwargs) -> SwapResult:
        """Serve an earlier version again, by installing a copy of it as the newest."""
        waiting = kwargs.get("progress", log.info)
        with control.repository_lock(
            self.repository, f"rollback of {stage}", self.lock_timeout_s, waiting
        ):
            source = self.rollback_source(stage, to)
            return self.swap(
                stage, source, accept_drift=True, note=f"rollback to v{source.name}", **kwargs
            )

    def rollback_source(self, stage: str, to: int | None = None) -> Path:
        """The version directory a rollback serves again: `to`, or the serving version's
        parent; refused when there is none."""
        model_dir = self.repository / stage
        existing = installed_versions(self.repository, stage)
        if to is None:
            current = Manifest.load(model_dir / str(existing[-1]))
            to = current.provenance.parent_version
            if to is None or to not in existing:
                raise SwapRefusedError(
                    f"{stage} v{existing[-1]} has no earlier version to go back to"
                )
        if to not in existing or to == existing[-1]:
            raise SwapRefusedError(f"{stage}: cannot roll back to v{to} (versions: {existing})")
        return model_dir / str(to)

    def _install(
        self,
        model_dir: Path,
        artifact: Path,
        manifest: Manifest,
        old: int,
        drift: DriftReport | None,
        note: str,
    ) -> int:
        """Write the candidate as version N+1: into a staging directory Triton ignores (not
        a number), checked against its manifest there, then renamed in one step. A failed
        write (a full disk) leaves no version directory and no staging directory behind."""
        new = old + 1
        staging = model_dir / f"{new}.incoming"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(artifact, staging, ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(model_dir / str(old) / ADAPTER, staging / ADAPTER)
            manifest.provenance.parent_version = old
            manifest.provenance.drift = drift
            manifest.provenance.note = note
            manifest.save(staging)
            Manifest.load(staging).verify(staging)  # what was written is what was meant
        except (OSError, ManifestError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise SwapRefusedError(
                f"could not write the candidate into {model_dir} ({exc}); nothing installed"
            ) from exc
        staging.rename(model_dir / str(new))
        return new

    def _restore(self, new_dir: Path, stage: str, old: int) -> None:
        # A load that was cut short here (Ctrl-C, SIGTERM) goes on in the server: removing
        # N+1 under it left the stage LOADING for good and the server not ready until a
        # restart. Its end is awaited first.
        self._wait_loaded(stage)
        shutil.rmtree(new_dir, ignore_errors=True)
        try:
            self.reload(stage, old)
        except Exception:
            log.exception("restoring %s v%d after a failed swap", stage, old)
            raise

    def _require_ready(self, models: list[str]) -> None:
        for model in models:
            try:
                ready = self.client.is_model_ready(model, client_timeout=control.ASK_S)
            except InferenceServerException as exc:
                raise SwapRefusedError(f"cannot reach the server at {self.url}: {exc}") from exc
            if not ready:
                raise SwapRefusedError(f"{model} is not ready on {self.url}; not swapping")

    def _wait_loaded(self, stage: str) -> None:
        """Wait (up to the ready timeout) until the server loads no version of `stage`."""
        deadline = time.monotonic() + self.ready_timeout_s
        while control.loading_versions(self.client, stage, self.token):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{stage} still loading after {self.ready_timeout_s:.0f}s")
            time.sleep(0.2)

    def _wait_ready(self, stage: str, version: int) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            ask = self.client.is_model_ready
            if ask(stage, str(version), client_timeout=control.ASK_S) and all(
                ask(e, client_timeout=control.ASK_S) for e in ENSEMBLE_NAMES
            ):
                return
            time.sleep(0.2)
        raise TimeoutError(f"{stage} v{version} not ready after {self.ready_timeout_s:.0f}s")

    def _baseline(self, current: Pipeline) -> dict[str, np.ndarray]:
        """The current pipeline's probe outputs, computed once per set of versions."""
        key = tuple(id(runner) for runner in current.runners.values())
        if self._baseline_cache is None or self._baseline_cache[0] != key:
            self._baseline_cache = (key, current.run(self.probes, RECOMMEND))
        return self._baseline_cache[1]

    def _verify(self, stage: str, version: int, want: dict[str, np.ndarray] | None) -> None:
        """Both ensembles answer the probes from `stage` v`version` (what they report; a
        repository built before answers carried versions reports none) and as the
        candidate pipeline did locally (`want`, when given)."""
        answers = {ensemble: self._infer(ensemble) for ensemble in ENSEMBLE_NAMES}
        for ensemble, result in answers.items():
            if stage not in ENSEMBLE_SPECS[ensemble].steps:
                continue  # user_interest does not retrieve
            reported = result.as_numpy(wire.version_output(stage))
            if reported is None:  # built before answers carried versions: parity says it
                continue
            if not (reported == version).all():
                found = sorted(set(reported.reshape(-1).tolist()))
                raise RuntimeError(
                    f"{ensemble} answers from {stage} versions {found}, not v{version}"
                )
        if want is None:
            return
        interest = answers[wire.USER_INTEREST].as_numpy(wire.USER_EMBEDDING)
        got = answers[wire.RECOMMEND].as_numpy(wire.ITEM_SCORES)
        if np.abs(interest - want[wire.USER_EMBEDDING]).max() > PARITY_ATOL:
            raise RuntimeError("served E_t differs from the candidate's on the probes")
        if np.abs(got - want[wire.ITEM_SCORES]).max() > PARITY_ATOL:
            raise RuntimeError("served recommendations differ from the candidate's on the probes")

    def _infer(self, ensemble: str) -> grpcclient.InferResult:
        """The probes as one request to `ensemble`: each of its inputs, by name."""
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for tensor in ENSEMBLE_SPECS[ensemble].inputs:
            value = self.probes[tensor.name]
            infer_input = grpcclient.InferInput(
                tensor.name, list(value.shape), np_to_triton_dtype(value.dtype)
            )
            infer_input.set_data_from_numpy(value)
            inputs.append(infer_input)
        return self.client.infer(ensemble, inputs, client_timeout=self.ready_timeout_s)


@dataclass
class VersionInfo:
    stage: str
    version: int
    serving: bool
    trained: bool
    created: str
    summary: str

    @property
    def state(self) -> str:
        """trained / untrained, or "no weights" for a stage that learns none (preprocess)."""
        if self.trained:
            return "trained"
        return "untrained" if stages.get(self.stage).learned else "no weights"


def list_versions(repository: Path) -> list[VersionInfo]:
    rows = []
    for stage in stages.NAMES:
        model_dir = repository / stage
        latest = int(latest_version(model_dir).name)
        for version in versions_of(model_dir):
            m = Manifest.load(model_dir / str(version))
            p = m.provenance
            bits = [f"data={p.data or '?'}"]
            if p.parent_version is not None:
                bits.append(f"parent=v{p.parent_version}")
            if p.note:
                bits.append(p.note)
            if p.candidate:
                bits.append(f"candidate={p.candidate}")
            if p.drift:
                bits.append(f"E_t cos={p.drift.embedding_cosine_mean:.3f}")
            rows.append(
                VersionInfo(
                    stage, version, version == latest, m.trained, m.created, ", ".join(bits)
                )
            )
    return rows
