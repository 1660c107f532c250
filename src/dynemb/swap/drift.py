"""How far a candidate version moves a stage's output and the final E_t, on fixed probes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynemb.data.synthetic import SyntheticConfig, generate
from dynemb.dims import DIMS
from dynemb.manifest import DriftReport
from dynemb.stages import Runner
from dynemb_client import Event, build_inputs
from dynemb_client import contract as wire

PROBE_K = 10


@dataclass(frozen=True)
class DriftThresholds:
    min_embedding_cosine: float = 0.95  # mean cosine(E_t current, E_t candidate)
    min_top10_overlap: float = 0.5  # mean |top-10 current ∩ top-10 candidate| / 10


def probe_inputs(n_users: int = 24, seed: int = 20_260_101) -> dict[str, np.ndarray]:
    """A fixed probe set: seeded synthetic histories (text, images, labels) + a cold start."""
    data = generate(SyntheticConfig(n_users=n_users, seed=seed))
    histories = [
        [Event(e.time, e.text, e.image, e.labels) for e in events[-DIMS.max_events :]]
        for events in data.dataset.by_user().values()
    ]
    histories.append([])
    at = [h[-1].time if h else 1_700_000_000.0 for h in histories]
    return build_inputs(histories, at, DIMS.max_events, DIMS.max_labels, top_k=PROBE_K)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine: 1 for two zero rows, 0 for one, else NaN where either is not
    finite (a NaN row had read as 1.0, so a NaN candidate's report showed no drift)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norm_a, norm_b = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cos = (a * b).sum(-1) / (norm_a * norm_b)
    one_zero = (norm_a == 0) | (norm_b == 0)
    return np.where((norm_a == 0) & (norm_b == 0), 1.0, np.where(one_zero, 0.0, cos))


def measure(
    old: dict[str, np.ndarray], new: dict[str, np.ndarray], candidate: Runner
) -> DriftReport:
    """Compare every tensor of the current pipeline's run (`old`) with the candidate's."""
    mask = old["EVENT_MASK"]
    stage_cos, finite = [], True
    for tensor in candidate.spec.outputs:
        a, b = old[tensor.name], new[tensor.name]
        if b.dtype.kind == "f":
            finite &= bool(np.isfinite(b).all())
            rows = mask if a.shape[:2] == mask.shape else np.ones(a.shape[0], dtype=bool)
            cos = _cosine(a.reshape(*rows.shape, -1), b.reshape(*rows.shape, -1))
            stage_cos.append(float(np.nan_to_num(cos[rows], nan=-1.0).mean()))
        elif b.dtype.kind != "O":
            stage_cos.append(float((a == b).mean()))
    e_old, e_new = old[wire.USER_EMBEDDING], new[wire.USER_EMBEDDING]
    finite &= bool(np.isfinite(e_new).all())
    cos = np.nan_to_num(_cosine(e_old, e_new), nan=-1.0)
    top_old, top_new = old[wire.ITEM_IDS], new[wire.ITEM_IDS]
    overlap = [len(set(a) & set(b)) / PROBE_K for a, b in zip(top_old, top_new, strict=True)]
    return DriftReport(
        stage_cosine=float(np.mean(stage_cos)) if stage_cos else 1.0,
        embedding_cosine_mean=float(cos.mean()),
        embedding_cosine_min=float(cos.min()),
        top10_overlap=float(np.mean(overlap)),
        finite=finite,
    )
