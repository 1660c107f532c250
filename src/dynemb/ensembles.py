"""The ensembles' wiring: which stages run, in which order, and what the ensembles expose.

Triton wires an ensemble's steps by tensor name (dynemb.tensors), so the steps' inputs and
outputs come straight from the stage specs; a unit test checks every step is fed. Each
build target (dynemb.targets) wires its own variant from the same specs.
"""

from __future__ import annotations

from dynemb import stages
from dynemb.dims import DIMS, Dims
from dynemb.specs import EnsembleSpec, StageSpec
from dynemb.targets import CPU, Target
from dynemb.tensors import Tensors
from dynemb_client import contract as wire

INTEREST_STEPS = wire.INTEREST_STAGES  # the client names them too: it reads their versions
RECOMMEND_STEPS = wire.RECOMMEND_STAGES
ENSEMBLE_NAMES = (wire.USER_INTEREST, wire.RECOMMEND)


def stage_specs(dims: Dims = DIMS, target: Target = CPU) -> dict[str, StageSpec]:
    """Every stage's spec as `target` serves it, in execution order."""
    return {name: target.stage_spec(stage, dims) for name, stage in stages.all_stages().items()}


def ensemble_specs(dims: Dims = DIMS, target: Target = CPU) -> dict[str, EnsembleSpec]:
    """The two ensembles; their inputs and outputs are the stages' own tensors, and the
    version of every step that computed the answer (of every step that reports one: a
    native model cannot)."""
    specs = stage_specs(dims, target)
    t = Tensors(dims)
    batch = {"max_batch_size": target.max_batch_size} if target.max_batch_size else {}

    def versions(steps: tuple[str, ...]) -> tuple:
        return tuple(specs[name].version_output for name in steps if specs[name].reports_version)

    return {
        wire.USER_INTEREST: EnsembleSpec(
            wire.USER_INTEREST,
            INTEREST_STEPS,
            inputs=specs[INTEREST_STEPS[0]].inputs,
            outputs=(*specs[INTEREST_STEPS[-1]].outputs, *versions(INTEREST_STEPS)),
            **batch,
        ),
        wire.RECOMMEND: EnsembleSpec(
            wire.RECOMMEND,
            RECOMMEND_STEPS,
            inputs=(*specs[RECOMMEND_STEPS[0]].inputs, t.top_k),
            # USER_EMBEDDING is internal here: an ensemble output that a later step also
            # consumes deadlocks Triton 2.51 when a client requests only the other outputs.
            outputs=(*specs[RECOMMEND_STEPS[-1]].outputs, *versions(RECOMMEND_STEPS)),
            **batch,
        ),
    }


STAGE_SPECS = stage_specs()
ENSEMBLE_SPECS = ensemble_specs()
MODELS: tuple[str, ...] = (*stages.NAMES, *ENSEMBLE_NAMES, wire.SESSION)  # all a server loads
