"""The ensemble on a real tritonserver: readiness, parity with the in-process pipeline,
batched == single, and recommendations."""

from __future__ import annotations

import random

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from dynemb.data.synthetic import draw_item_image
from dynemb.dims import DIMS
from dynemb.ensembles import ENSEMBLE_SPECS, STAGE_SPECS
from dynemb.manifest import Manifest
from dynemb.pipeline import latest_version
from dynemb_client import Event, InterestClient, ModelShape, build_inputs
from dynemb_client.contract import INTEREST_STAGES, OP_START, RECOMMEND_STAGES, SESSION
from dynemb_client.requests import versions_asked
from dynemb_client.results import parse_versions
from dynemb_client.sessions import session_call

T0 = 1_700_000_000.0
L = DIMS.max_events


def history(n: int, images: bool, seed: int = 0) -> list[Event]:
    rng = random.Random(seed)
    return [
        Event(
            T0 + 3600 * i + rng.random(),
            f"{rng.choice(['Crimson', 'Azure', 'Golden'])} circle lamp #{i}",
            draw_item_image(i % 6, rng, 32) if images and i % 4 else None,
            [f"category:c{i % 6}", "action:view"],
        )
        for i in range(n)
    ]


def test_every_model_is_ready(live):
    client = grpcclient.InferenceServerClient(live.url)
    for name in (*STAGE_SPECS, *ENSEMBLE_SPECS):
        assert client.is_model_ready(name), name
    assert client.is_server_ready()


def test_the_served_stages_are_the_trained_ones(live):
    for stage in ("text_rnn", "image_cnn", "label_mlp", "temporal_lstm", "llm_encoder"):
        manifest = Manifest.load(latest_version(live.repository / stage))
        assert manifest.trained and manifest.provenance.best_epoch >= 1


@pytest.mark.parametrize("n", [0, 1, L, L + 7])
@pytest.mark.parametrize("images", [False, True])
def test_served_embedding_equals_in_process_pipeline(live, pipeline, n, images):
    events = history(n, images, seed=n)
    with InterestClient(live.url) as client:
        served = client.embed(events)
    x = build_inputs([events], [None], L, DIMS.max_labels)
    local = pipeline.embed(x)[0]
    assert served.shape == (DIMS.embed_dim,) and served.dtype == np.float32
    assert np.isfinite(served).all()
    assert np.abs(served - local).max() <= 1e-4
    assert np.linalg.norm(served) == pytest.approx(1.0, abs=1e-5)


def test_batched_equals_single(live):
    histories = [history(n, images=n % 2 == 0, seed=n) for n in (0, 3, 17, L, L + 3)]
    with InterestClient(live.url) as client:
        together = client.embed_many(histories)
        alone = np.stack([client.embed(h) for h in histories])
    assert together.shape == (5, DIMS.embed_dim)
    np.testing.assert_allclose(together, alone, atol=1e-5, rtol=0)


def test_longer_history_keeps_the_most_recent_events(live):
    events = history(L + 10, images=False)
    with InterestClient(live.url) as client:
        np.testing.assert_allclose(client.embed(events), client.embed(events[-L:]), atol=1e-6)


def test_embedding_depends_on_query_time(live):
    events = history(10, images=True)
    with InterestClient(live.url) as client:
        now = client.embed(events)
        week_later = client.embed(events, at=events[-1].time + 7 * 86400)
    assert np.abs(now - week_later).max() > 1e-4


def test_recommend_returns_titled_items_matching_the_pipeline(live, pipeline):
    events = history(12, images=True)
    with InterestClient(live.url) as client:
        items = client.recommend(events, k=10)
    assert len(items) == 10
    scores = [item.score for item in items]
    assert scores == sorted(scores, reverse=True)
    table = pipeline.runners["retrieve"].retriever.table
    titles = dict(zip(table.ids, table.titles, strict=True))
    assert all(titles[item.item_id] == item.title for item in items)
    x = build_inputs([events], [None], L, DIMS.max_labels, top_k=10)
    local = pipeline.run(x, ensemble="recommend")
    assert [i.item_id for i in items] == [v.decode() for v in local["ITEM_IDS"][0]]


def test_recommend_leaves_out_excluded_items(live):
    events = history(12, images=True)
    with InterestClient(live.url) as client:
        ranked = client.recommend(events, k=20)
        left_out = {ranked[0].item_id, ranked[2].item_id, "not-an-item"}
        items = client.recommend(events, k=10, exclude=left_out)
        (batched,) = client.recommend_many([events], k=10, exclude=[left_out])
    # The next items of the same ranking, still 10 of them.
    expected = [r.item_id for r in ranked if r.item_id not in left_out][:10]
    assert [i.item_id for i in items] == expected
    assert [i.item_id for i in batched] == expected


def served_versions(live, stages) -> dict[str, int]:
    """The version each stage serves: the newest on disk (other tests swap stages)."""
    return {name: int(latest_version(live.repository / name).name) for name in stages}


def test_every_answer_says_which_stage_versions_computed_it(live):
    histories = [history(n, images=True, seed=n) for n in (0, 5, L)]
    with InterestClient(live.url) as client:
        embedded = client.embed_many_versioned(histories)
        recommended = client.recommend_many_versioned(histories, k=5)
        np.testing.assert_allclose(embedded.value, client.embed_many(histories), atol=1e-6)
        plain = client.recommend_many(histories, k=5)
    assert embedded.versions == served_versions(live, INTEREST_STAGES)
    assert recommended.versions == served_versions(live, RECOMMEND_STAGES)
    assert [[r.item_id for r in user] for user in recommended.value] == [
        [r.item_id for r in user] for user in plain
    ]


def test_the_asyncio_client_reports_versions_too(live):
    import asyncio

    from dynemb_client import AsyncInterestClient

    async def ask():
        async with AsyncInterestClient(live.url) as client:
            return await client.recommend_many_versioned([history(3, images=False)], k=3)

    answer = asyncio.run(ask())
    assert answer.versions == served_versions(live, RECOMMEND_STAGES)
    assert len(answer.value[0]) == 3


def test_a_session_answer_reports_the_versions_it_was_computed_with(live):
    shape = ModelShape(L, DIMS.max_labels)
    call = session_call(SESSION, "versions-0", OP_START, history(4, images=True), T0 + 1e5, shape)
    call = versions_asked(call, INTEREST_STAGES)
    result = grpcclient.InferenceServerClient(live.url).infer(
        call.model, call.inputs, outputs=call.outputs
    )
    assert parse_versions(result, SESSION, 1, INTEREST_STAGES) == served_versions(
        live, INTEREST_STAGES
    )


@pytest.mark.parametrize("asynchronous", [False, True])
def test_calls_the_client_stops_waiting_for_leave_the_server_up(live, asynchronous) -> None:
    """tritonserver 2.51 died of SIGSEGV after two calls to `user_interest` whose 1 ms
    deadline ran out in flight (server#7368). The client sends no deadline: a call past its
    timeout, or whose caller is cancelled, is left to finish, and `close` waits for it."""
    import asyncio

    from dynemb_client import AsyncInterestClient, ServerError

    users = [history(50, images=False, seed=s) for s in range(8)]
    pid = live.server.process.pid
    if asynchronous:

        async def stop_waiting() -> None:
            async with AsyncInterestClient(live.url) as client:
                await client.model_shape()  # fetched within the usual timeout
                for _ in range(5):  # the caller cancelled
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(client.embed_many(users), 0.002)
                client._timeout_s = 0.001  # the client's own timeout, for the ensemble calls
                for _ in range(5):
                    with pytest.raises(ServerError, match="Deadline Exceeded"):
                        await client.embed_many(users)

        asyncio.run(stop_waiting())
    else:
        with InterestClient(live.url) as client:
            client.model_shape()
            client._timeout_s = 0.001
            for _ in range(10):
                with pytest.raises(ServerError, match="Deadline Exceeded"):
                    client.embed_many(users)
    with InterestClient(live.url) as client:
        assert client.embed(users[0]).shape == (DIMS.embed_dim,)
    assert live.server.running() and live.server.process.pid == pid, live.server.log_tail()
