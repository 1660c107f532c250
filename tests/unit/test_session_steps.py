"""The session's LSTM and MiniLM steps under ONNX Runtime (exported from the loaded
weights) equal their torch functions, for one user and many, new sessions and long
ones, masks with holes; and the engine built either way answers the same."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dynemb.manifest import Manifest
from dynemb.pipeline import latest_version
from dynemb.sessions.engine import SessionEngine
from dynemb.stages.llm_encoder.step import EncoderStep, KVCache
from dynemb.stages.temporal_lstm.step import LSTMStep

TOL = 1e-4  # the sessions' stated tolerance; float32 sums in another order differ ~1e-5


@pytest.fixture(scope="module")
def steps(repo):
    out = {}
    for runtime in ("torch", "onnxruntime"):
        enc_dir, lstm_dir = (
            latest_version(repo / "llm_encoder"),
            latest_version(repo / "temporal_lstm"),
        )
        out[runtime] = (
            EncoderStep.load(enc_dir, Manifest.load(enc_dir), runtime),
            LSTMStep.load(lstm_dir, Manifest.load(lstm_dir), runtime),
        )
    return out


@pytest.mark.parametrize(
    ("users", "new", "past"), [(1, 1, 30), (32, 1, 49), (3, 1, 0), (5, 3, 0), (4, 2, 7)]
)
@torch.inference_mode()
def test_the_minilm_step_under_onnxruntime_equals_torch(steps, users, new, past):
    torch_step, ort_step = steps["torch"][0], steps["onnxruntime"][0]
    g = torch.Generator().manual_seed(users + new + past)
    shape = (users, torch_step.heads, past, torch_step.head_dim)
    layers = len(torch_step.layers)
    tokens = torch.randn(users, new, torch_step.hidden, generator=g)
    mask = torch.rand(users, new, generator=g) > 0.3
    mask[:, 0] = True
    mask = mask.cummin(dim=1).values  # real tokens first
    past_mask = torch.arange(past)[None, :] < torch.randint(0, past + 1, (users, 1), generator=g)
    keys, values = ([torch.randn(shape, generator=g) for _ in range(layers)] for _ in "kv")
    cache = KVCache(tuple(keys), tuple(values), past_mask)
    want = torch_step.extend(tokens, mask, cache)
    got = ort_step.extend(tokens, mask, cache)
    assert got[0].shape == want[0].shape == (users, torch_step.hidden)  # the newest's state
    assert (got[0] - want[0]).abs().max() < TOL
    real = mask[:, None, :, None]  # (B, 1, K, 1): the real new tokens' keys and values
    for got_kv, want_kv in ((got[1], want[1]), (got[2], want[2])):
        assert len(got_kv) == len(want_kv) == layers
        for o, w in zip(got_kv, want_kv, strict=True):
            assert o.shape == w.shape == (users, torch_step.heads, new, torch_step.head_dim)
            assert (o - w).abs().mul(real).max() < TOL


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
@torch.inference_mode()
def test_the_newest_state_is_the_same_read_at_once_or_in_two_parts(steps, runtime):
    """`extend` from nothing then over the rest gives the newest state that `newest` gives
    over the whole sequence (the served export's function), for users of different
    lengths; and the keys and values it keeps carry the first part to the second."""
    step = steps[runtime][0]
    g = torch.Generator().manual_seed(7)
    users, n, first = 5, 30, 12
    tokens = torch.randn(users, n, step.hidden, generator=g)
    counts = torch.tensor([13, 14, 20, 29, 30])  # every user reads past the first part
    mask = torch.arange(n)[None, :] < counts[:, None]
    want = step.newest(tokens, mask)
    _, keys, values = step.extend(tokens[:, :first], mask[:, :first], step.empty(users))
    past = KVCache(keys, values, mask[:, :first])
    got, _, _ = step.extend(tokens[:, first:], mask[:, first:], past)
    assert got.shape == want.shape == (users, step.hidden)
    assert (got - want).abs().max() < TOL


@pytest.mark.parametrize(("users", "new"), [(1, 1), (32, 1), (3, 4)])
@torch.inference_mode()
def test_the_lstm_step_under_onnxruntime_equals_torch(steps, users, new):
    torch_step, ort_step = steps["torch"][1], steps["onnxruntime"][1]
    d = torch_step.network.dims
    g = torch.Generator().manual_seed(users * 10 + new)
    x = [torch.randn(users, new, k, generator=g) for k in (d.text_dim, d.image_dim, d.label_dim)]
    x.append(torch.randn(users, new, d.time_dim, generator=g))
    state = (torch.randn(users, d.seq_dim, generator=g), torch.randn(users, d.seq_dim, generator=g))
    full = torch.ones(users, new, dtype=torch.bool)
    want, got = torch_step.extend(*x, full, state), ort_step.extend(*x, full, state)
    assert (got[0] - want[0]).abs().max() < TOL
    assert max((a - b).abs().max() for a, b in zip(got[1], want[1], strict=True)) < TOL
    # A batch with a user reading fewer events takes the torch path, packed.
    ragged = full.clone()
    ragged[0, 1:] = False
    ragged[-1, :] = False
    want, got = torch_step.extend(*x, ragged, state), ort_step.extend(*x, ragged, state)
    assert (got[0] - want[0]).abs().max() < TOL
    torch.testing.assert_close(got[1][0][-1], state[0][-1])  # no events: state kept


def test_an_engine_on_either_runtime_answers_the_same(repo, monkeypatch):
    """Sessions of different lengths stepped together, one event each: under ONNX Runtime
    that batch is the one-call step (dynemb.sessions.fused), under torch the general
    one; both answer the same."""
    from dynemb.sessions.fused import OneEventStep
    from dynemb_client import Event, build_inputs

    engines = {r: SessionEngine.from_repository(repo, runtime=r) for r in ("torch", "onnxruntime")}
    assert engines["torch"].one_event is None
    calls = []
    one_call = OneEventStep.__call__
    monkeypatch.setattr(
        OneEventStep, "__call__", lambda self, *a, **k: calls.append(1) or one_call(self, *a, **k)
    )
    d = engines["torch"].dims
    streams = [
        [
            Event(1.7e9 + 3_600 * i + 60 * u, f"item {(i + u) % 7}", None, [f"category:c{i % 3}"])
            for i in range(14)
        ]
        for u in range(3)
    ]
    starts = (8, 3, 10)  # sessions holding different numbers of tokens: padded past

    def wire(new, at):
        x = build_inputs([new], [at], d.max_events, d.max_labels)
        return {k: v[0] for k, v in x.items()}

    answers = {}
    for runtime, engine in engines.items():
        begun = [(None, wire(s[:n], s[n - 1].time)) for s, n in zip(streams, starts, strict=True)]
        states = [done.state for done in engine.advance(begun)]
        out = []
        for k in range(4):
            batch = [
                (state, wire([s[n + k]], s[n + k].time))
                for state, s, n in zip(states, streams, starts, strict=True)
            ]
            done = engine.advance(batch)
            states = [a.state for a in done]
            out.append(np.stack([a.embedding for a in done]))
        answers[runtime] = np.stack(out)
    assert len(calls) == 4  # every step of the ONNX Runtime engine was the one call
    np.testing.assert_allclose(answers["onnxruntime"], answers["torch"], atol=1e-5)
    with pytest.raises(ValueError, match="runtime"):
        SessionEngine.from_repository(repo, runtime="tensorrt")


def test_starts_and_re_windows_are_one_call_under_onnxruntime_and_answer_as_torch(
    repo, monkeypatch
):
    """Sessions read from nothing (new ones of different lengths, and re-windows past L,
    one beside steps of others) take the one-call path under ONNX Runtime
    (`FromNothingStep`), and answer and hold what the torch engine's general step does."""
    from dynemb.sessions.fused import FromNothingStep
    from dynemb_client import Event, build_inputs

    block = 7
    engines = {
        r: SessionEngine.from_repository(repo, rewindow_block=block, runtime=r)
        for r in ("torch", "onnxruntime")
    }
    assert engines["torch"].from_nothing is None
    calls: list[int] = []
    call = FromNothingStep.__call__
    monkeypatch.setattr(
        FromNothingStep,
        "__call__",
        lambda self, events, **k: calls.append(len(events)) or call(self, events, **k),
    )
    d = engines["torch"].dims
    L = d.max_events  # noqa: N806
    streams = [
        [
            Event(1.7e9 + 3_600 * i + 60 * u, f"item {(i + u) % 9}", None, [f"category:c{i % 4}"])
            for i in range(L + 12)
        ]
        for u in range(3)
    ]
    starts = (L, L - 2, 5)  # re-windows at different events, the third within L throughout

    def wire(new):
        x = build_inputs([new], [new[-1].time], L, d.max_labels)
        return {k: v[0] for k, v in x.items()}

    answers, held = {}, {}
    for runtime, engine in engines.items():
        states = [
            done.state
            for done in engine.advance(
                [(None, wire(s[:n])) for s, n in zip(streams, starts, strict=True)]
            )
        ]
        out = []
        for k in range(10):
            done = engine.advance(
                [
                    (state, wire([s[n + k]]))
                    for state, s, n in zip(states, streams, starts, strict=True)
                ]
            )
            states = [a.state for a in done]
            out.append(np.stack([a.embedding for a in done]))
        answers[runtime] = np.stack(out)
        held[runtime] = states
    # The three starts (their lengths differ: a call each), then user 0 re-windows at steps
    # 0 and 7 and user 1 at steps 2 and 9 (every B = 7 events), each alone beside steps.
    assert calls == [1] * 7
    np.testing.assert_allclose(answers["onnxruntime"], answers["torch"], atol=1e-5)
    for got, want in zip(held["onnxruntime"], held["torch"], strict=True):
        assert got.n_events == want.n_events
        for name in ("lstm_h", "lstm_c", "newest", "keys", "values"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5)


def test_a_batch_of_sessions_reads_each_one_s_keys_and_values_and_zeros_after_them(
    repo, monkeypatch
):
    """The past a step reads: each stored session's keys and values, then zeros (never
    whatever the memory held: a masked position still multiplies its value by 0, and
    0 * NaN is NaN), for sessions of different lengths and one from nothing."""
    import dynemb.sessions.engine as engine_module
    from dynemb.sessions.engine import _Plan

    engine = SessionEngine.from_repository(repo)
    layers, heads, head_dim = len(engine.encoder.layers), engine.encoder.heads, 8
    g = np.random.default_rng(0)

    def stored(n: int) -> SimpleNamespace:
        shape = (layers, heads, n, head_dim)
        return SimpleNamespace(keys=g.standard_normal(shape), values=g.standard_normal(shape))

    bases = [stored(5), None, stored(2)]
    plans = [_Plan.__new__(_Plan) for _ in bases]
    for plan, base in zip(plans, bases, strict=True):
        plan.base = base

    def poisoned(shape, dtype):  # what np.empty might have handed out
        return np.full(shape, np.nan, dtype)

    monkeypatch.setattr(engine_module.np, "empty", poisoned)
    monkeypatch.setattr(engine_module.np, "empty_like", lambda a: poisoned(a.shape, a.dtype))
    past = engine._past(plans)
    monkeypatch.undo()
    assert past.mask.tolist() == [[True] * 5, [False] * 5, [True, True, False, False, False]]
    for i in range(layers):
        for got, kind in ((past.keys[i].numpy(), "keys"), (past.values[i].numpy(), "values")):
            assert got.shape == (3, heads, 5, head_dim)
            np.testing.assert_allclose(got[0], getattr(bases[0], kind)[i])
            np.testing.assert_allclose(got[2, :, :2], getattr(bases[2], kind)[i])
            assert not got[1].any() and not got[2, :, 2:].any()


def test_a_state_counts_its_labels_as_a_recount_would_through_steps_and_re_windows(repo):
    """A step counts only its new label rows' bytes on top of its base's; after events
    of different label sizes, re-windows (every 7 events past L) and a batch of several,
    each state's count is a recount of the rows it holds, and so is its size. It counts
    every event it read, the ones re-windowed away too."""
    from dataclasses import replace

    from dynemb.stages.preprocess.features import label_row_bytes
    from dynemb_client import Event, build_inputs

    engine = SessionEngine.from_repository(repo, rewindow_block=7)
    d = engine.dims
    labels = [["a"], ["genre:drama", "rating:4"], [], ["x" * 40, "y", "z"]]
    events = [
        Event(1.7e9 + 60 * i, f"t{i % 5}", None, labels[i % 4]) for i in range(d.max_events + 20)
    ]

    def wire(new):
        x = build_inputs([new], [new[-1].time], d.max_events, d.max_labels)
        return {k: v[0] for k, v in x.items()}

    [done] = engine.advance([(None, wire(events[:5]))])
    state, k = done.state, 5
    while k < len(events):
        n = 1 if k % 3 else 3  # some updates carry several events
        [done] = engine.advance([(state, wire(events[k : k + n]))])
        state, k = done.state, k + n
        assert state.label_bytes == label_row_bytes(state.labels)
        assert state.nbytes == replace(state, label_bytes=None).nbytes
        assert state.read == min(k, len(events))  # every event read, through re-windows
    assert state.n_events < d.max_events  # it re-windowed


def test_a_state_owns_its_arrays_and_holds_nothing_uncounted(repo):
    """States started, stepped and re-windowed in one batch hold arrays of their own: never
    views of the request's tensors or of the batch's per-item vectors, which would stay
    alive uncounted by the store's byte bound as long as any one state of the batch."""
    from dynemb_client import Event, build_inputs

    engine = SessionEngine.from_repository(repo, rewindow_block=7)
    d = engine.dims
    streams = [
        [Event(1.7e9 + 60 * i + u, f"t{(i + u) % 5}", None, ["genre:a"]) for i in range(60)]
        for u in range(3)
    ]

    def wire(new):
        x = build_inputs([new], [new[-1].time], d.max_events, d.max_labels)
        return {k: v[0] for k, v in x.items()}

    requests = [wire(s[: d.max_events]) for s in streams]
    done = engine.advance([(None, x) for x in requests])
    states = [a.state for a in done]
    stepped = engine.advance(
        [(s, wire([stream[d.max_events]])) for s, stream in zip(states, streams, strict=True)]
    )
    for state in [*states, *(a.state for a in stepped)]:
        for array in (state.times, state.ratings, state.events):
            assert array.base is None or array.base.nbytes == array.nbytes, array.shape
            for x in requests:
                assert not np.shares_memory(array, x["EVENT_TIME"])
    assert stepped[0].state.n_events < d.max_events  # the step re-windowed
