"""Errors the stages raise for one request's bad input; the adapters turn them into
per-request Triton errors so the other requests of a batch still succeed."""

from __future__ import annotations


class InputError(ValueError):
    """A request's input is malformed. `field` names the tensor (and element) at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
