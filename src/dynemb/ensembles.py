"""The ensembles' wiring: which stages run, in which order, and what the ensembles expose.

Triton wires an ensemble's steps by tensor name (dynemb.tensors), so the steps' inputs and
outputs come straight from the stage specs; a unit test checks every step is fed.
"""

from __future__ import annotations

from dynemb import stages
from dynemb.dims import DIMS, Dims
from dynemb.specs import EnsembleSpec, StageSpec
from dynemb.tensors import Tensors
from dynemb_client import contract as wire

INTEREST_STEPS = ("preprocess", "text_rnn", "image_cnn", "label_mlp", "temporal_lstm")
INTEREST_STEPS += ("llm_encoder",)
RECOMMEND_STEPS = (*INTEREST_STEPS, "retrieve")
ENSEMBLE_NAMES = (wire.USER_INTEREST, wire.RECOMMEND)


def stage_specs(dims: Dims = DIMS) -> dict[str, StageSpec]:
    """Every stage's spec, in execution order."""
    return {name: stage.spec(dims) for name, stage in stages.all_stages().items()}


def ensemble_specs(dims: Dims = DIMS) -> dict[str, EnsembleSpec]:
    """The two ensembles; their inputs and outputs are the stages' own tensors."""
    specs = stage_specs(dims)
    t = Tensors(dims)
    return {
        wire.USER_INTEREST: EnsembleSpec(
            wire.USER_INTEREST,
            INTEREST_STEPS,
            inputs=specs[INTEREST_STEPS[0]].inputs,
            outputs=specs[INTEREST_STEPS[-1]].outputs,
        ),
        wire.RECOMMEND: EnsembleSpec(
            wire.RECOMMEND,
            RECOMMEND_STEPS,
            inputs=(*specs[RECOMMEND_STEPS[0]].inputs, t.top_k),
            # USER_EMBEDDING is internal here: an ensemble output that a later step also
            # consumes deadlocks Triton 2.51 when a client requests only the other outputs.
            outputs=specs[RECOMMEND_STEPS[-1]].outputs,
        ),
    }


STAGE_SPECS = stage_specs()
ENSEMBLE_SPECS = ensemble_specs()
MODELS: tuple[str, ...] = (*stages.NAMES, *ENSEMBLE_NAMES, wire.SESSION)  # all a server loads
