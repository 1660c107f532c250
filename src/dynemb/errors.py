"""dynemb's own error types.

`DynembError` marks a failure the command line reports as one clear line and a non-zero
exit, without a traceback: a bad line in an events file, a missing checkpoint, a server
that is not up, a refused swap. `InputError` is one request's bad input; the adapters
turn it into that request's own Triton error so the rest of its batch still succeeds.
"""

from __future__ import annotations


class DynembError(Exception):
    """A failure with a message meant for the user."""


class UsageError(DynembError, ValueError):
    """Arguments that cannot be carried out (e.g. a stage that cannot be fine-tuned)."""


class InputError(ValueError):
    """A request's input is malformed. `field` names the tensor (and element) at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message  # without the field
        # The batch row (user) at fault, where a batched call knows it: the others of the
        # batch are then run again together, without it (dynemb.serving.adapter.respond).
        self.row: int | None = None
