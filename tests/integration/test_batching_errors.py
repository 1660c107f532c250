"""Dynamic batching merges concurrent requests in every stage; bad input fails alone."""

from __future__ import annotations

import queue
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from dynemb.bench.faults import infer_inputs
from dynemb.data.synthetic import draw_item_image
from dynemb.dims import DIMS
from dynemb.ensembles import STAGE_SPECS
from dynemb_client import ClientInputError, Event, InterestClient, build_inputs

T0 = 1_700_000_000.0


def events(n: int, seed: int) -> list[Event]:
    rng = random.Random(seed)
    return [
        Event(
            T0 + 600 * i,
            f"item {rng.randrange(100)}",
            draw_item_image(i % 6, rng, 32),
            ["category:c1"],
        )
        for i in range(n)
    ]


def stage_counts(client) -> dict[str, tuple[int, int]]:
    stats = client.get_inference_statistics(as_json=True)["model_stats"]
    return {
        s["name"]: (int(s.get("inference_count", 0)), int(s.get("execution_count", 0)))
        for s in stats
        if s["name"] in STAGE_SPECS
    }


def settled_counts(client, before, expected: int, timeout: float = 10.0):
    """Statistics once every stage has counted `expected` more inferences.

    Triton records a model's statistics after it has sent the response, so the
    last stage of the ensemble may still be counting when the client has its
    answer; poll (bounded) instead of reading once.
    """
    deadline = time.monotonic() + timeout
    while True:
        after = stage_counts(client)
        done = all(after[s][0] - before[s][0] >= expected for s in STAGE_SPECS)
        if done or time.monotonic() > deadline:
            return after
        time.sleep(0.05)


def test_dynamic_batching_merges_concurrent_requests(live):
    admin = grpcclient.InferenceServerClient(live.url)
    before = stage_counts(admin)
    histories = [events(20, seed) for seed in range(8)]

    def worker(i: int) -> np.ndarray:
        with InterestClient(live.url) as client:
            return np.stack(
                [client.recommend(histories[(i + j) % 8], k=5)[0].score for j in range(6)]
            )

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(worker, range(16)))
    assert all(np.isfinite(r).all() for r in results)
    after = settled_counts(admin, before, 16 * 6)
    for stage in STAGE_SPECS:
        inferences = after[stage][0] - before[stage][0]
        executions = after[stage][1] - before[stage][1]
        assert inferences == 16 * 6, stage
        assert executions < inferences, f"{stage}: no batching ({executions} executions)"


def good_inputs(seed: int) -> dict[str, np.ndarray]:
    return build_inputs([events(5, seed)], [None], DIMS.max_events, DIMS.max_labels)


def _set(name, index, value):
    def mutate(x):
        x[name][index] = value
        return x

    return mutate


BAD = {
    "non-UTF-8 text": (_set("EVENT_TEXT", (0, 1), b"caf\xe9"), "EVENT_TEXT[1]"),
    "undecodable image": (_set("EVENT_IMAGE", (0, 2), b"\x89PNG\r\n\x1a\n..."), "EVENT_IMAGE[2]"),
    "negative time": (_set("EVENT_TIME", (0, 0), -1.0), "EVENT_TIME[0]"),
    "future overflow time": (_set("EVENT_TIME", (0, 4), 1e18), "EVENT_TIME[4]"),
    "query time overflow": (_set("QUERY_TIME", (0, 0), np.inf), "QUERY_TIME"),
    "count out of range": (_set("EVENT_COUNT", (0, 0), 99), "EVENT_COUNT"),
    "too many labels": (
        lambda x: dict(
            x, EVENT_LABELS=np.full((1, DIMS.max_events, DIMS.max_labels + 1), b"a:b", dtype=object)
        ),
        "EVENT_LABELS",
    ),
    "wrong dtype": (lambda x: dict(x, EVENT_TIME=x["EVENT_TIME"].astype(np.float32)), "EVENT_TIME"),
    "wrong shape": (lambda x: dict(x, EVENT_TEXT=x["EVENT_TEXT"][:, :7]), "EVENT_TEXT"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_alone_with_a_clear_error(live, case):
    mutate, field = BAD[case]
    client = grpcclient.InferenceServerClient(live.url)
    done: queue.Queue = queue.Queue()
    payloads = [good_inputs(s) for s in range(6)]
    payloads.insert(3, mutate(good_inputs(99)))
    for i, x in enumerate(payloads):  # all in flight together, so they can share batches
        client.async_infer(
            "user_interest",
            infer_inputs(x),
            callback=lambda result, error, i=i: done.put((i, result, error)),
        )
    outcomes = dict((i, (r, e)) for i, r, e in (done.get(timeout=60) for _ in payloads))
    result, error = outcomes.pop(3)
    assert result is None and isinstance(error, InferenceServerException)
    assert field in error.message(), error.message()
    for i, (result, error) in outcomes.items():
        assert error is None, f"neighbour {i} failed: {error}"
        assert np.isfinite(result.as_numpy("USER_EMBEDDING")).all()


def test_client_validates_before_sending(live):
    with InterestClient(live.url) as client:
        with pytest.raises(ClientInputError) as info:
            client.embed([Event(-5, "before 1970")])
        assert info.value.field == "EVENT_TIME"
        with pytest.raises(ClientInputError) as info:
            client.embed([Event(T0, "x", labels=[f"l:{i}" for i in range(DIMS.max_labels + 1)])])
        assert info.value.field == "EVENT_LABELS"
        with pytest.raises(ClientInputError) as info:
            client.embed([Event(T0, "x", image=b"not an image")])
        assert info.value.field == "EVENT_IMAGE"
