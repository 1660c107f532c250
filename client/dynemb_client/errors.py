"""Typed errors, so callers can tell their own bad input from a server that failed."""

from __future__ import annotations

__all__ = ["ClientInputError", "ServerError", "ServerInputError", "ServerUnavailable"]


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
        self.model = model
        self.status = status
        self.url = url


class ServerUnavailable(ServerError):  # noqa: N818 (public name fixed by the API)
    """Every attempt failed to reach a server (UNAVAILABLE or a connection error)."""


class ServerInputError(ServerError, ValueError):
    """The server refused the request as malformed (INVALID_ARGUMENT): the caller's mistake,
    found by the server's own checks; the message names the tensor. Not retried."""


class SessionUpdateError(ServerInputError):
    """Some sessions of an `update_many` were refused as bad input: `failed` maps each to
    its error; every other session was updated, with its E_t in `applied`. None of a
    refused session's new events were applied."""

    def __init__(self, applied: dict, failed: dict[str, ServerInputError]) -> None:
        names = ", ".join(repr(s) for s in list(failed)[:5])
        first = next(iter(failed.values()))
        super().__init__(
            f"{len(failed)} session(s) refused ({names}): {first}",
            model=first.model,
            status=first.status,
            url=first.url,
        )
        self.applied = applied
        self.failed = failed
