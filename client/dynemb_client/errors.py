"""Typed errors, so callers can tell their own bad input from a server that failed."""

from __future__ import annotations

from tritonclient.utils import InferenceServerException

__all__ = [
    "ClientInputError",
    "PartialUpdateError",
    "ServerError",
    "ServerInputError",
    "ServerUnavailable",
    "SessionLostError",
    "SessionUpdateError",
]


class ClientInputError(ValueError):
    """A request the client refuses to send, because the server would reject it anyway.

    `field` is the contract tensor the bad value belongs to (e.g. "EVENT_TIME"), `index` the
    event's position in the caller's history (None for per-request values such as
    QUERY_TIME), `history` the position of that history in a batch (None for one history).
    """

    def __init__(
        self,
        message: str,
        *,
        field: str,
        index: int | None = None,
        history: int | None = None,
    ) -> None:
        where = []
        if history is not None:
            where.append(f"history {history}")
        if index is not None:
            where.append(f"event {index}")
        prefix = f"{field} ({', '.join(where)})" if where else field
        super().__init__(f"{prefix}: {message}")
        self.reason = message
        self.field = field
        self.index = index
        self.history = history


class ServerError(RuntimeError):
    """The server answered with an error (or could not be reached).

    `status` is the gRPC status without its "StatusCode." prefix (e.g. "INVALID_ARGUMENT");
    the original tritonclient exception is the `__cause__`.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        status: str | None = None,
        url: str | None = None,
    ) -> None:
        parts = [p for p in (model, f"[{status}]" if status else None) if p]
        super().__init__(f"{' '.join(parts)}: {message}" if parts else message)
        self.reason = message  # without the model and status
        self.model = model
        self.status = status
        self.url = url


class ServerUnavailable(ServerError):  # noqa: N818 (public name fixed by the API)
    """Every attempt failed to reach a server (UNAVAILABLE or a connection error)."""


class ServerInputError(ServerError, ValueError):
    """The server refused the request as malformed (INVALID_ARGUMENT): the caller's mistake,
    found by the server's own checks; the message names the tensor. Not retried."""


class SessionLostError(ServerError):
    """The server no longer holds a session's state, and this client keeps only part of
    the session's window (the session was started by another client or process, or its
    history was dropped here): starting it again from that part would answer for fewer
    events than the session read. Send the session's events with `history=`."""


class PartialUpdateError(ServerError):
    """Some sessions of an `update_many` were not updated: `failed` maps each to its error;
    every other session was updated, with its E_t in `applied` (send the failed ones' events
    again, not the others'). A session refused as bad input or lost (see
    SessionUpdateError) had none of its events applied. One whose call failed otherwise
    (a server error, a timeout, no server answering) may have had them applied: the
    client starts it again from its kept window on its next update, so sending its
    events again never counts them twice."""

    verb = "not updated"

    def __init__(self, applied: dict, failed: dict[str, Exception]) -> None:
        names = ", ".join(repr(s) for s in list(failed)[:5])
        first = next(iter(failed.values()))
        # its model and status lead this message: its own text follows without them
        detail = first.reason if isinstance(first, ServerError) else str(first)
        super().__init__(
            f"{len(failed)} session(s) {self.verb} ({names}): {detail}",
            model=getattr(first, "model", None),
            status=getattr(first, "status", None),
            url=getattr(first, "url", None),
        )
        self.applied = applied
        self.failed = failed


class SessionUpdateError(PartialUpdateError, ServerInputError):
    """A PartialUpdateError whose sessions were all refused as bad input (by the server,
    ServerInputError, or before sending, ClientInputError), or lost with only part of
    their window kept here (SessionLostError): none of a failed session's new events were
    applied."""

    verb = "refused"


# What makes a failure worth sending again (`is_transient`): gRPC statuses that mean "no
# server took the request", and tritonserver's messages while a stage is reloaded.
_RETRYABLE_STATUSES = frozenset({"UNAVAILABLE"})
_STUB_DOWN = "is not healthy"
_RELOADING = "has no available versions"


def status_of(exc: BaseException) -> str | None:
    """ "StatusCode.UNAVAILABLE" -> "UNAVAILABLE"; None when the error carries no status."""
    if isinstance(exc, InferenceServerException) and exc.status():
        return str(exc.status()).removeprefix("StatusCode.")
    return None


def error_message(exc: BaseException) -> str:
    """The server's message of a tritonclient error, else the exception's text."""
    return exc.message() if isinstance(exc, InferenceServerException) else str(exc)


def is_transient(exc: BaseException) -> bool:
    """No server could judge the request, so sending it again (here or elsewhere) is safe:
    a connection-level failure, UNAVAILABLE, or one of the two answers tritonserver 2.51
    gives while a stage is down and being reloaded (dynemb.supervisor): INTERNAL "Stub
    process ... is not healthy" before the reload, NOT_FOUND "... has no available
    versions" during it (a model that does not exist at all says "is not found")."""
    if isinstance(exc, ConnectionError):
        return True
    status = status_of(exc)
    message = error_message(exc) or ""
    if status in _RETRYABLE_STATUSES:
        return True
    return (status == "INTERNAL" and _STUB_DOWN in message) or (
        status == "NOT_FOUND" and _RELOADING in message
    )
