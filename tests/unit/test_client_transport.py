"""InterestClient / AsyncInterestClient against a fake inner tritonclient (no server)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

import dynemb_client.aio as aio_mod
import dynemb_client.client as client_mod
from dynemb_client import (
    AsyncInterestClient,
    Event,
    InterestClient,
    Recommendation,
    ServerError,
    ServerInputError,
    ServerUnavailable,
)
from dynemb_client.contract import (
    EVENT_LABELS,
    EVENT_TEXT,
    ITEM_IDS,
    ITEM_SCORES,
    ITEM_TITLES,
    TOP_K,
    USER_EMBEDDING,
)
from dynemb_client.transport import shape_from_metadata

L, M, D = 5, 2, 4
HISTORY = [Event(1_700_000_000, "Toy Story", labels=("genre:Comedy",))]
METADATA = {
    "name": "user_interest",
    "inputs": [
        {"name": EVENT_TEXT, "datatype": "BYTES", "shape": ["-1", str(L)]},
        {"name": EVENT_LABELS, "datatype": "BYTES", "shape": ["-1", str(L), str(M)]},
    ],
}


def unavailable() -> InferenceServerException:
    return InferenceServerException(msg="failed to connect", status="StatusCode.UNAVAILABLE")


def invalid() -> InferenceServerException:
    return InferenceServerException(
        msg="EVENT_TIME must be non-decreasing", status="StatusCode.INVALID_ARGUMENT"
    )


class FakeResult:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self._outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self._outputs.get(name)


class Server:
    """What every fake endpoint shares: a log of calls and a script of failures."""

    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = list(failures or [])
        self.calls: list[tuple[str, str]] = []  # (url, method)
        self.requests: list[dict] = []
        self.closed: list[str] = []

    def answer(self, url: str, method: str):
        self.calls.append((url, method))
        if self.failures:
            raise self.failures.pop(0)

    def outputs(self, model: str, inputs) -> FakeResult:
        shapes = {tensor.name(): tensor.shape() for tensor in inputs}
        self.requests.append({"model": model, "shapes": shapes})
        batch = shapes[EVENT_TEXT][0]
        if model == "recommend":
            ids = np.array([[b"i1", b"i2", b""]] * batch, dtype=object)
            titles = np.array([[b"One", "Two ☕".encode(), b""]] * batch, dtype=object)
            scores = np.array([[0.9, 0.5, -np.inf]] * batch, dtype=np.float32)
            return FakeResult({ITEM_IDS: ids, ITEM_SCORES: scores, ITEM_TITLES: titles})
        embedding = np.arange(batch * D, dtype=np.float32).reshape(batch, D)
        return FakeResult({USER_EMBEDDING: embedding})


def answer(callback, infer) -> None:
    """`callback(result, error)` as tritonclient's `async_infer` calls it."""
    try:
        result = infer()
    except Exception as error:  # as an RPC error comes; Ctrl-C is no answer
        callback(None, error)
    else:
        callback(result, None)


class FakeInner:
    def __init__(self, server: Server, url: str) -> None:
        self.server, self.url = server, url

    def get_model_metadata(self, model_name, as_json=False, client_timeout=None):
        self.server.answer(self.url, "metadata")
        assert as_json
        return METADATA

    def infer(self, model_name, inputs, outputs=None, client_timeout=None):
        self.server.answer(self.url, "infer")
        return self.server.outputs(model_name, inputs)

    def async_infer(self, model_name, inputs, callback, outputs=None):
        """As tritonclient's: the answer or the error through `callback` (here at once)."""
        answer(callback, lambda: self.infer(model_name, inputs, outputs=outputs))

    def is_server_ready(self, client_timeout=None):
        self.server.answer(self.url, "ready")
        return True

    def is_model_ready(self, model_name, client_timeout=None):
        self.server.answer(self.url, "model_ready")
        return True

    def close(self):
        self.server.closed.append(self.url)


class AsyncFakeInner(FakeInner):
    async def get_model_metadata(self, *args, **kwargs):
        return FakeInner.get_model_metadata(self, *args, **kwargs)

    async def infer(self, *args, **kwargs):
        return FakeInner.infer(self, *args, **kwargs)

    async def is_server_ready(self, *args, **kwargs):
        return FakeInner.is_server_ready(self, *args, **kwargs)

    async def is_model_ready(self, *args, **kwargs):
        return FakeInner.is_model_ready(self, *args, **kwargs)

    async def close(self):
        FakeInner.close(self)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waited: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(client_mod.time, "sleep", waited.append)
    monkeypatch.setattr(aio_mod.asyncio, "sleep", async_sleep)
    return waited


def fake_server(monkeypatch: pytest.MonkeyPatch, failures=None) -> Server:
    server = Server(failures)
    monkeypatch.setattr(
        client_mod.grpcclient, "InferenceServerClient", lambda url: FakeInner(server, url)
    )
    monkeypatch.setattr(
        aio_mod.grpcclient, "InferenceServerClient", lambda url: AsyncFakeInner(server, url)
    )
    return server


def test_embed_reads_shape_once_and_sends_padded_tensors(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)
    with InterestClient("host:1") as client:
        first = client.embed(HISTORY)
        client.embed(HISTORY, at=1_700_000_100)
        assert client.model_shape().max_events == L
    assert first.shape == (D,) and first.dtype == np.float32
    assert [method for _, method in server.calls] == ["metadata", "infer", "infer"]
    shapes = server.requests[0]["shapes"]
    assert shapes[EVENT_TEXT] == [1, L] and shapes[EVENT_LABELS] == [1, L, M]
    assert TOP_K not in shapes
    assert server.closed == ["host:1"]


def test_embed_many_is_one_request(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)
    client = InterestClient()
    embeddings = client.embed_many([HISTORY, [], HISTORY], at=1_700_000_500)
    assert embeddings.shape == (3, D)
    assert [m for _, m in server.calls].count("infer") == 1
    assert server.requests[0]["shapes"][EVENT_TEXT] == [3, L]
    client.embed_many([HISTORY, HISTORY], at=[None, 1_700_000_001])


def test_recommend_skips_padding_and_decodes(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)
    client = InterestClient()
    items = client.recommend(HISTORY, k=3)
    assert items == [
        Recommendation(item_id="i1", score=pytest.approx(0.9), title="One"),
        Recommendation(item_id="i2", score=pytest.approx(0.5), title="Two ☕"),
    ]
    assert client.recommend(HISTORY, k=1)[0].item_id == "i1"
    assert server.requests[0]["model"] == "recommend"
    assert server.requests[0]["shapes"][TOP_K] == [1, 1]
    assert [len(r) for r in client.recommend_many([HISTORY, HISTORY], k=2)] == [2, 2]


def test_unavailable_is_retried_with_exponential_backoff(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch, failures=[unavailable(), unavailable()])
    client = InterestClient(retries=3, backoff_s=0.1, jitter=False)
    assert client.embed(HISTORY).shape == (D,)
    assert sleeps == pytest.approx([0.1, 0.2])
    assert [m for _, m in server.calls] == ["metadata"] * 3 + ["infer"]


def test_connection_error_is_retried(monkeypatch, sleeps) -> None:
    fake_server(monkeypatch, failures=[ConnectionResetError("reset by peer")])
    assert InterestClient(backoff_s=0.5, jitter=False).embed(HISTORY).shape == (D,)
    assert sleeps == [0.5]


def test_unavailable_after_all_retries_raises_server_unavailable(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch, failures=[unavailable()] * 10)
    client = InterestClient(retries=2, backoff_s=0.1, jitter=False)
    with pytest.raises(ServerUnavailable) as info:
        client.embed(HISTORY)
    assert len(server.calls) == 3
    assert sleeps == pytest.approx([0.1, 0.2])
    assert info.value.status == "UNAVAILABLE" and info.value.model == "user_interest"
    assert isinstance(info.value.__cause__, InferenceServerException)


def test_invalid_argument_is_not_retried(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)
    client = InterestClient(retries=5)
    client.model_shape()
    server.failures = [invalid()]
    with pytest.raises(ServerInputError) as info:
        client.embed(HISTORY)
    assert isinstance(info.value, ServerError) and isinstance(info.value, ValueError)
    assert not isinstance(info.value, ServerUnavailable)
    assert info.value.status == "INVALID_ARGUMENT"
    assert info.value.model == "user_interest"
    assert "EVENT_TIME must be non-decreasing" in str(info.value)
    assert [m for _, m in server.calls] == ["metadata", "infer"]
    assert sleeps == []


def test_round_robin_over_urls(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)
    client = InterestClient(urls=["a:1", "b:1", "c:1"])
    for _ in range(5):
        client.embed(HISTORY)
    assert [url for url, _ in server.calls] == ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1"]
    client.close()
    assert sorted(server.closed) == ["a:1", "b:1", "c:1"]


def test_retry_moves_to_the_next_endpoint(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)
    client = InterestClient(urls=["a:1", "b:1"])
    client.model_shape()  # served by a
    server.failures = [unavailable()]  # b is down once
    client.embed(HISTORY)
    assert server.calls[1:] == [("b:1", "infer"), ("a:1", "infer")]


def test_is_ready_checks_every_endpoint(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)
    client = InterestClient(urls=["a:1", "b:1"])
    assert client.is_ready()
    server.failures = [unavailable()]
    assert not client.is_ready()
    assert sleeps == []


def test_input_errors_are_raised_before_any_request(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)
    client = InterestClient()
    with pytest.raises(ValueError, match="TOP_K"):
        client.recommend(HISTORY, k=0)
    assert [m for _, m in server.calls] == ["metadata"]


def test_async_client_round_robins(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch)

    async def main():
        async with AsyncInterestClient(urls=["a:1", "b:1"], backoff_s=0.25) as client:
            assert await client.is_ready()
            server.calls.clear()
            one = await client.embed(HISTORY)
            many = await client.embed_many([HISTORY, HISTORY])
            items = await client.recommend(HISTORY, k=5)
            batches = await client.recommend_many([HISTORY], k=5)
        return one, many, items, batches

    one, many, items, batches = asyncio.run(main())
    assert one.shape == (D,) and many.shape == (2, D)
    assert [i.item_id for i in items] == ["i1", "i2"] and len(batches) == 1
    # metadata once, then four inferences, alternating endpoints
    assert [url for url, _ in server.calls] == ["a:1", "b:1", "a:1", "b:1", "a:1"]
    assert sorted(server.closed) == ["a:1", "b:1"]


def test_async_unavailable_backoff_and_invalid_argument(monkeypatch, sleeps) -> None:
    server = fake_server(monkeypatch, failures=[unavailable(), unavailable()])

    async def main():
        client = AsyncInterestClient(retries=3, backoff_s=0.1, jitter=False)
        await client.embed(HISTORY)
        server.failures = [invalid()]
        with pytest.raises(ServerError) as info:
            await client.embed(HISTORY)
        await client.close()
        return info.value

    error = asyncio.run(main())
    assert sleeps == pytest.approx([0.1, 0.2])
    assert error.status == "INVALID_ARGUMENT" and not isinstance(error, ServerUnavailable)


def test_shape_from_metadata_rejects_a_foreign_model() -> None:
    assert shape_from_metadata(METADATA, "m").max_labels == M
    with pytest.raises(ServerError, match=EVENT_LABELS):
        shape_from_metadata({"inputs": METADATA["inputs"][:1]}, "m")
    bad = {"inputs": [METADATA["inputs"][0], {"name": EVENT_LABELS, "shape": [-1, L + 1, M]}]}
    with pytest.raises(ServerError):
        shape_from_metadata(bad, "m")


def test_retries_stop_at_the_deadline_with_jittered_back_off(monkeypatch) -> None:
    """The default policy retries until its deadline; each wait is in [b/2, b]."""
    clock = [0.0]
    waits: list[float] = []

    def fake_sleep(seconds: float) -> None:
        waits.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr("dynemb_client.client.time.sleep", fake_sleep)
    monkeypatch.setattr("dynemb_client.client.time.monotonic", lambda: clock[0])
    fake_server(monkeypatch, failures=[unavailable()] * 10_000)
    client = InterestClient(retry_deadline_s=10.0, backoff_s=0.1)
    with pytest.raises(ServerUnavailable, match="no server answered in"):
        client.embed(HISTORY)
    assert sum(waits) <= 10.0 and sum(waits) > 10.0 - 2.0  # up to the deadline, not past
    for attempt, wait in enumerate(waits):
        cap = min(2.0, 0.1 * 2**attempt)
        assert cap / 2 <= wait <= cap


def test_a_stage_being_reloaded_is_transient_other_errors_are_not() -> None:
    from dynemb_client.errors import is_transient

    def error(message: str, status: str) -> InferenceServerException:
        return InferenceServerException(msg=message, status=f"StatusCode.{status}")

    assert is_transient(error("Stub process 'text_rnn_0_0' is not healthy.", "INTERNAL"))
    reloading = "Request for unknown model: 'recommend' has no available versions"
    assert is_transient(error(reloading, "NOT_FOUND"))
    assert not is_transient(error("Request for unknown model: 'x' is not found", "NOT_FOUND"))
    assert not is_transient(error("boom", "INTERNAL"))
    assert not is_transient(error("bad", "INVALID_ARGUMENT"))


@pytest.mark.parametrize("configured", [False, True])
def test_the_client_logs_only_where_the_application_sends_its_logs(configured):
    """A retry's warning reached stderr through logging's last resort in a program that
    configured no logging; with logging configured it is there as before."""
    import subprocess
    import sys

    program = (
        "import logging\n"
        + ("logging.basicConfig()\n" if configured else "")
        + "from dynemb_client import InterestClient, ServerUnavailable\n"
        "try:\n"
        "    InterestClient('127.0.0.1:1', retries=1).embed([])\n"
        "except ServerUnavailable:\n"
        "    print('unavailable')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert done.stdout == "unavailable\n"
    assert ("retry 1" in done.stderr) == configured, done.stderr
