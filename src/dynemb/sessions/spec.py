"""The `session` model's spec and options (no torch here: configs are generated from it)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from dynemb.dims import Dims
from dynemb.sessions.state import StateStore
from dynemb.specs import StageSpec, TensorSpec
from dynemb.tensors import Tensors
from dynemb_client import contract as wire


@dataclass(frozen=True)
class SessionOptions:
    """The store's bounds and the version check, as config.pbtxt parameters. A session
    within the window holds up to about 0.36 MB (mostly MiniLM's keys and values, with
    two layers), a full window about 35 kB."""

    max_users: int = 100_000
    max_mb: float = 1024.0
    ttl_s: float = 3_600.0
    version_check_s: float = 0.25  # how often it asks which stage versions are served
    # Past the window a session re-windows to its newest L - B + 1 events once every B
    # events and steps in between (dynemb.sessions.state.window_after); 1 = always the
    # newest L, recomputed at every event. Chosen on ML-100k quality and cost:
    # benchmarks/results/sessions-quality-ml100k.md.
    rewindow_block: int = 25

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> SessionOptions:
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(parameters) - set(known))
        if unknown:
            raise ValueError(f"session: unknown parameters {unknown}; known: {sorted(known)}")
        values = {}
        for name, raw in parameters.items():
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(f"session: parameter {name} must be finite, got {raw!r}")
            if value < 0 or (value == 0 and name != "version_check_s"):
                raise ValueError(f"session: parameter {name} must be > 0, got {raw!r}")
            if known[name] in (int, "int"):
                if value != int(value):
                    raise ValueError(f"session: parameter {name} must be whole, got {raw!r}")
                value = int(value)
            values[name] = value
        return cls(**values)

    def parameters(self) -> tuple[tuple[str, str], ...]:
        return tuple((f.name, str(getattr(self, f.name))) for f in fields(self))

    def store(self) -> StateStore:
        return StateStore(self.max_users, int(self.max_mb * 2**20), self.ttl_s)


# The session's event tensors: as the ensembles' but with an events axis of any width up
# to L, since an update carries its new events only (padded to L, a one-event update of
# 32 users sent 16,000 BYTES elements for 320 real ones, a third of its server time).
EVENT_TENSORS = (wire.EVENT_TEXT, wire.EVENT_IMAGE, wire.EVENT_LABELS, wire.EVENT_TIME)


def session_spec(dims: Dims, options: SessionOptions | None = None) -> StageSpec:
    t = Tensors(dims)
    sent = tuple(
        replace(tensor, dims=(-1, *tensor.dims[1:]))
        for tensor in (t.event_text, t.event_image, t.event_labels, t.event_time)
    )
    return StageSpec(
        name=wire.SESSION,
        inputs=(
            TensorSpec(wire.SESSION_ID, "BYTES", (1,)),
            TensorSpec(wire.SESSION_OP, "INT32", (1,)),
            *sent,
            t.event_count,
            t.query_time,
        ),
        outputs=(
            t.user_embedding,
            TensorSpec(wire.SESSION_STATUS, "INT32", (1,)),
            TensorSpec(wire.SESSION_EVENTS, "INT32", (1,)),
            TensorSpec(wire.SESSION_READ, "INT64", (1,)),
            # the session stages are the user_interest ensemble's (a unit test checks it)
            *(TensorSpec(wire.version_output(s), "INT64", (1,)) for s in wire.INTEREST_STAGES),
        ),
        reports_version=False,  # its outputs hold the versions of the stages it runs
        max_batch_size=wire.MAX_SESSION_ROWS,  # the client's update_many fills requests to it
        instances=1,  # every state lives in this one process
        description="E_t advanced by a user's new events (per-user state)",
        parameters=(options or SessionOptions()).parameters(),
    )
