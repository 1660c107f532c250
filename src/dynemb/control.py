"""Protected model control: a token guards load/unload/index, log and trace settings and
shared-memory registration; inference stays open.

The server starts with `--grpc-restricted-protocol=model-repository,logging,trace,
shared-memory:dynemb-control=TOKEN` (and the HTTP twin); gRPC clients send
`triton-grpc-protocol-dynemb-control: TOKEN`, HTTP clients `dynemb-control: TOKEN`.
The token comes from DYNEMB_CONTROL_TOKEN, else from a file created on first use with
mode 0600. Note: Triton takes it as a command-line flag, so local users who can list
processes can read it; bind to loopback (the default) unless the host is trusted.

What changes the versions a server loads from a repository (a swap, a rollback, a rolling
swap, the supervisor's recovery of a stage) holds the repository's control lock
(`repository_lock`), so that two of them never interleave: two swaps would both write
version N+1, and a recovery's unload and load in the middle of a swap would reload the
stage under the swap's checks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dynemb.errors import DynembError
from dynemb.paths import cache_dir

log = logging.getLogger(__name__)

TOKEN_ENV = "DYNEMB_CONTROL_TOKEN"
LOCK_WAIT_S = 600.0  # a swap or a recovery is bounded by a few ready timeouts
ASK_S = 10.0  # a question to the server: one that takes longer is not answering
# What needs the token: model control, and what changes the server's behaviour (log and
# trace settings, shared-memory regions). Inference, health, metadata, statistics stay open.
PROTECTED = ("model-repository", "logging", "trace", "shared-memory")
HEADER_KEY = "dynemb-control"
GRPC_HEADER = f"triton-grpc-protocol-{HEADER_KEY}"


class ControlError(DynembError, RuntimeError):
    """Model control was refused or failed."""


def token_file() -> Path:
    return cache_dir() / "control-token"


def load_token(create: bool = True) -> str | None:
    """The control token: environment first, then the token file (created 0600 if asked)."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    path = token_file()
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ControlError(f"{path} is readable by others; chmod 600 it")
        token = path.read_text(encoding="utf-8").strip()
        if not token:  # an empty key would restrict nothing
            raise ControlError(f"{path} holds no control token; delete it to have one made")
        return token
    if not create:
        return None
    # Written whole under a temporary name, then linked into place: no process ever reads
    # a created but not yet written (or, on a full disk, empty) token file.
    token = secrets.token_urlsafe(32)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(partial, path)  # fails if another process made one first
    except FileExistsError:
        return load_token(create=False)
    finally:
        partial.unlink(missing_ok=True)
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_args(token: str | None, host: str) -> list[str]:
    """tritonserver flags that protect model control; refuse an open non-loopback server."""
    if token is None:
        if not is_loopback(host):
            raise ControlError(
                f"refusing to serve on non-loopback host {host!r} without a control token "
                f"(set {TOKEN_ENV} or let `dynemb serve` create {token_file()})"
            )
        return []
    if not token.isascii() or any(c.isspace() or c in ",=" for c in token):
        raise ControlError("the control token must be ASCII without spaces, ',' or '='")
    if not token:
        raise ControlError("the control token is empty: it would protect nothing")
    protected = ",".join(PROTECTED)
    return [
        f"--grpc-restricted-protocol={protected}:{HEADER_KEY}={token}",
        f"--http-restricted-api={protected}:{HEADER_KEY}={token}",
    ]


def headers(token: str | None) -> dict[str, str] | None:
    return {GRPC_HEADER: token} if token else None


def load_model(
    client: grpcclient.InferenceServerClient,
    model: str,
    token: str | None,
    timeout_s: float | None = None,
) -> None:
    """Load (or reload) a model through the protected repository API, giving up after
    `timeout_s` (a stage whose start hangs). A refusal for the token is a ControlError
    (Triton answers it as UNAVAILABLE, which looks transient)."""
    try:
        client.load_model(model, headers=headers(token), client_timeout=timeout_s)
    except InferenceServerException as exc:
        if _refused(exc):
            raise ControlError(
                "model control refused by the server (missing or wrong control token): "
                f"{exc.message()}"
            ) from exc
        raise


def _refused(exc: InferenceServerException) -> bool:
    """Whether the server refused a protected call for its token."""
    message = (exc.message() or "").lower()
    return "not allowed" in message or "restricted" in message


def check_access(client: grpcclient.InferenceServerClient, token: str | None) -> None:
    """Refuse with a ControlError unless `token` opens the server's model control (asked
    through the repository index, which changes nothing): a swap found out only after it
    had installed its version and asked for the load."""
    try:
        client.get_model_repository_index(headers=headers(token), client_timeout=ASK_S)
    except InferenceServerException as exc:
        if _refused(exc):
            where = "DYNEMB_CONTROL_TOKEN" if token is None else "the token given"
            raise ControlError(
                f"model control refused by the server (no token from {where} opens it; "
                "set DYNEMB_CONTROL_TOKEN to the server's, or run where `dynemb serve` "
                "made its token file)"
            ) from exc
        raise


def loading_versions(
    client: grpcclient.InferenceServerClient, model: str, token: str | None
) -> list[str]:
    """The versions of `model` the server is loading now, from the repository index."""
    index = client.get_model_repository_index(
        headers=headers(token), as_json=True, client_timeout=ASK_S
    )
    return [
        str(m.get("version", ""))
        for m in index.get("models", [])
        if m.get("name") == model and m.get("state") == "LOADING"
    ]


_held = threading.local()  # realpath -> depth, of the locks this thread holds


@contextlib.contextmanager
def repository_lock(
    repository: Path,
    what: str,
    timeout_s: float = LOCK_WAIT_S,
    waiting: Callable[[str], None] | None = None,
    poll_s: float = 0.1,
) -> Iterator[None]:
    """Hold `repository`'s control lock while `what` runs (one swap, rollback or stage
    recovery at a time, across processes and threads). A thread that holds it already
    holds it again (a rolling swap's first replica swaps under the roll's hold). Waits up
    to `timeout_s` for another holder, telling `waiting` once, then raises ControlError.

    The lock is an flock on the repository directory itself: nothing is written there,
    and a read-only repository can be locked too. Where the file system cannot lock, the
    holder goes on without one, with a warning (there is then nothing to wait for)."""
    key = os.path.realpath(repository)
    depth: dict[str, int] = _held.__dict__.setdefault("depth", {})
    if depth.get(key):
        depth[key] += 1
        try:
            yield
        finally:
            depth[key] -= 1
        return
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _acquire(fd, key, what, timeout_s, waiting, poll_s)
        depth[key] = 1
        try:
            yield
        finally:
            del depth[key]
    finally:
        os.close(fd)  # releases the lock


def _acquire(
    fd: int,
    key: str,
    what: str,
    timeout_s: float,
    waiting: Callable[[str], None] | None,
    poll_s: float,
) -> None:
    deadline = time.monotonic() + timeout_s
    told = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("%s: the file system cannot lock (%s); %s goes on unlocked", key, exc, what)
            return
        if time.monotonic() >= deadline:
            raise ControlError(
                f"{key}: another swap, rollback or stage recovery still holds the control "
                f"lock after {timeout_s:.0f} s; {what} did not start"
            )
        if not told and waiting is not None:
            waiting(f"{what}: waiting for another swap, rollback or stage recovery on {key}")
            told = True
        time.sleep(poll_s)
