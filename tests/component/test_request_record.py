"""Every request on record (swapctl.proxy.record): GET /requests and its fields, bound, filter
and order; the `request` events; captures (bounded, never a key); and a request cancelled in
flight while its model serves on. Over the fake backend."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from support import FakeStack

from swapctl.backend.fake import FakeContainer, FakeModel

pytestmark = pytest.mark.anyio

USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
TIMINGS = {"prompt_n": 7, "predicted_n": 5, "prompt_per_second": 300.0, "predicted_per_second": 50.5}
SECRETS = {"authorization": "Bearer sk-secret-1", "x-api-key": "sk-secret-2", "cookie": "session=sk-secret-3"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _long_stream(release: asyncio.Event) -> AsyncIterator[bytes]:
    chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "one"}}]}
    yield f"data: {json.dumps(chunk)}\n\n".encode()
    await release.wait()  # a generation that goes on until it is cancelled
    yield b"data: [DONE]\n\n"


class Server:
    """The fake model's server: answers with usage and llama.cpp's timings; a request with
    `"long": true` streams one chunk and then waits for `release` (a plain one waits first)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, request: httpx.Request, box: FakeContainer) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200 if box.ready else 503, json={"status": "ok"})
        body = json.loads(await request.aread())
        headers = {"content-type": "text/event-stream"}
        if body.get("long") and body.get("stream"):
            return httpx.Response(200, headers=headers, content=_long_stream(self.release))
        if body.get("long"):
            await self.release.wait()
        if body.get("stream"):
            chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "hi"}}]}
            last = {"object": "chat.completion.chunk", "choices": [], "usage": USAGE, "timings": TIMINGS}
            events = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(last)}\n\ndata: [DONE]\n\n"
            return httpx.Response(200, headers=headers, content=events.encode())
        message = {"role": "assistant", "content": "hi " + body.get("pad", "")}
        answer = {
            "object": "chat.completion",
            "choices": [{"message": message}],
            "usage": USAGE,
            "timings": TIMINGS,
        }
        return httpx.Response(200, json=answer)


class Stack(FakeStack):
    def __init__(self, **config: Any) -> None:
        models = {"a": {"image": "img", "aliases": ["alias-a"]}, "b": {"image": "img"}}
        super().__init__({"instance": "test", "models": models, **config})
        self.server = Server()
        for model in models:
            self.backend.behaviour[model] = FakeModel(handler=self.server)

    async def chat(self, model: str, **extra: Any) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.client.post("/v1/chat/completions", json=body, headers=SECRETS)

    async def record(self, query: str = "") -> list[dict[str, Any]]:
        found = await self.client.get("/requests" + query)
        assert found.status_code == 200, found.text
        requests: list[dict[str, Any]] = found.json()["requests"]
        return requests

    async def in_flight(self, began: bool) -> dict[str, Any]:
        """The request in flight, once it is (and, if `began`, once its answer began)."""
        for _ in range(1000):
            flying = [r for r in await self.record() if r["in_flight"]]
            if flying and (flying[0]["first_byte_seconds"] is not None or not began):
                return flying[0]
            await asyncio.sleep(0.01)
        raise AssertionError("no request in flight")


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    found = Stack()
    yield found
    await found.close()


async def test_a_request_on_record_with_its_tokens_speed_place_and_swap(stack: Stack) -> None:
    assert (await stack.chat("alias-a")).status_code == 200
    assert (await stack.chat("a", stream=True)).status_code == 200
    streamed, whole = await stack.record()
    assert whole["model"] == "a" and whole["route"] == "/v1/chat/completions" and whole["method"] == "POST"
    assert (whole["status"], whole["in_flight"], whole["place"], whole["cancelled"]) == (
        200,
        False,
        "local",
        False,
    )
    assert (whole["prompt_tokens"], whole["completion_tokens"]) == (7, 5)
    assert (whole["tokens_per_s"], whole["prompt_tokens_per_s"]) == (50.5, 300.0)
    assert 0 < whole["first_byte_seconds"] <= whole["seconds"]
    # the first request started the model: the swap it waited for
    assert whole["swap"]["model"] == "a" and whole["swap"]["ok"] is True
    assert (streamed["prompt_tokens"], streamed["completion_tokens"], streamed["tokens_per_s"]) == (
        7,
        5,
        50.5,
    )
    assert streamed["swap"] is None  # it found the model ready
    assert int(streamed["id"]) > int(whole["id"])


async def test_the_record_is_bounded_newest_first_and_filtered() -> None:
    stack = Stack(requestRecord=3)
    try:
        for model in ("a", "b", "a", "b", "a"):
            assert (await stack.chat(model)).status_code == 200
        found = await stack.record()
        assert [r["model"] for r in found] == ["a", "b", "a"]
        ids = [int(r["id"]) for r in found]
        assert ids == sorted(ids, reverse=True) and ids[0] == 5
        assert [r["model"] for r in await stack.record("?model=b")] == ["b"]
        assert [r["model"] for r in await stack.record("?model=alias-a")] == ["a", "a"]
        assert [int(r["id"]) for r in await stack.record("?limit=1")] == [5]
        bad = await stack.client.get("/requests?limit=many")
        assert bad.status_code == 400 and "limit" in bad.json()["error"]["message"]
        # an error answered before any model server: on record too
        unknown = await stack.client.get("/requests/1")
        assert unknown.status_code == 404 and "'1'" in unknown.json()["error"]["message"]
    finally:
        await stack.close()


async def test_no_record_when_it_is_off() -> None:
    stack = Stack(requestRecord=0)
    try:
        assert (await stack.chat("a")).status_code == 200
        assert await stack.record() == []
    finally:
        await stack.close()


async def test_each_request_ended_is_an_event(stack: Stack) -> None:
    with stack.swapper.activity.subscribe({"request"}) as subscription:
        await stack.chat("a")
        await stack.chat("b", stream=True)
        first = await asyncio.wait_for(anext(subscription), 5)
        second = await asyncio.wait_for(anext(subscription), 5)
    assert (first.name, first.data["model"], first.data["status"]) == ("request", "a", 200)
    assert (second.data["model"], second.data["completion_tokens"]) == ("b", 5)
    assert b"event: request\ndata: {" in second.frame


async def test_captures_hold_bodies_never_keys(stack: Stack) -> None:
    assert (await stack.chat("a")).status_code == 200
    assert (await stack.record())[0]["captured"] is False  # off by default
    captured = Stack(captureBuffer=1)
    try:
        assert (await captured.chat("a", user="me")).status_code == 200
        assert (await captured.chat("a", stream=True)).status_code == 200
        streamed, whole = await captured.record()
        one = (await captured.client.get(f"/requests/{whole['id']}")).json()
        capture = one["capture"]
        assert json.loads(capture["request"]["body"])["user"] == "me"
        assert json.loads(capture["response"]["body"])["usage"] == USAGE
        assert ("content-type", "application/json") in [tuple(h) for h in capture["request"]["headers"]]
        text = json.dumps(one)
        assert not any(secret in text for secret in ("sk-secret", "authorization", "x-api-key", "cookie"))
        events = (await captured.client.get(f"/requests/{streamed['id']}")).json()["capture"]
        assert events["response"]["body"].endswith("data: [DONE]\n\n") and events["cut"] is False
    finally:
        await captured.close()


async def test_captures_are_bounded_oldest_dropped() -> None:
    stack = Stack(captureBuffer=1)
    pad = "x" * 300_000  # each request: its body and its answer, about 600 kB
    try:
        for _ in range(3):
            assert (await stack.chat("a", pad=pad)).status_code == 200
        newest, middle, oldest = await stack.record()
        assert (newest["captured"], oldest["captured"]) == (True, False)
        one = (await stack.client.get(f"/requests/{newest['id']}")).json()["capture"]
        assert one["bytes"] <= 2**20 and not one["cut"]
        total = 0
        for found in (newest, middle, oldest):
            if found["captured"]:
                total += (await stack.client.get(f"/requests/{found['id']}")).json()["capture"]["bytes"]
        assert total <= 2**20
        # a stream longer than the whole buffer is cut at the bound
        assert (await stack.chat("a", pad="y" * 2**20)).status_code == 200
        cut = (await stack.client.get(f"/requests/{(await stack.record())[0]['id']}")).json()["capture"]
        assert cut["cut"] is True and cut["bytes"] <= 2**20
    finally:
        await stack.close()


async def test_a_long_stream_cancelled_while_its_model_serves_on(stack: Stack) -> None:
    await stack.use("a")
    client = asyncio.create_task(stack.chat("a", stream=True, long=True))
    flying = await stack.in_flight(began=True)
    cancelled = await stack.client.post(f"/requests/{flying['id']}/cancel")
    assert cancelled.status_code == 202 and cancelled.json()["cancelled"] is True
    answer = await asyncio.wait_for(client, 10)
    assert answer.status_code == 200
    assert "data: " in answer.text and "request_cancelled" in answer.text and "model 'a'" in answer.text
    ended = (await stack.record())[0]
    assert (ended["status"], ended["cancelled"], ended["in_flight"]) == (499, True, False)
    # the model serves the next request, in the same container
    assert (await stack.chat("a")).status_code == 200
    assert stack.backend.starts["a"] == 1
    assert [s.in_flight for s in stack.swapper.status() if s.model == "a"] == [0]
    again = await stack.client.post(f"/requests/{flying['id']}/cancel")
    assert again.status_code == 409 and "ended" in again.json()["error"]["message"]


async def test_a_request_cancelled_before_its_answer_is_a_499_naming_the_model(stack: Stack) -> None:
    await stack.use("b")
    client = asyncio.create_task(stack.chat("b", long=True))
    flying = await stack.in_flight(began=False)
    assert (await stack.client.post(f"/requests/{flying['id']}/cancel")).status_code == 202
    answer = await asyncio.wait_for(client, 10)
    assert answer.status_code == 499
    error = answer.json()["error"]
    assert error["code"] == "request_cancelled" and "model 'b'" in error["message"]
    assert (await stack.record())[0]["status"] == 499
    assert (await stack.chat("b")).status_code == 200


async def test_a_stream_cancelled_while_its_model_loads_ends_in_an_error_event() -> None:
    stack = Stack(healthCheckTimeout=2)  # the start it leaves fails soon after
    stack.backend.behaviour["b"] = FakeModel(handler=stack.server, ready_after=3600)
    try:
        client = asyncio.create_task(stack.chat("b", stream=True))
        flying = await stack.in_flight(began=False)
        assert (await stack.client.post(f"/requests/{flying['id']}/cancel")).status_code == 202
        answer = await asyncio.wait_for(client, 10)
        assert answer.status_code == 200  # its head went out before the wait
        assert "request_cancelled" in answer.text and "model 'b'" in answer.text
        ended = (await stack.record())[0]
        assert (ended["status"], ended["cancelled"]) == (499, True)
    finally:
        await stack.close()


async def test_the_last_hour_for_the_charts(stack: Stack) -> None:
    assert (await stack.chat("a")).status_code == 200
    assert (await stack.chat("a", stream=True)).status_code == 200
    await stack.client.post("/unload/a")
    found = await stack.client.get("/history")
    assert found.status_code == 200
    history = found.json()
    assert (history["bucket"], history["span"]) == (10.0, 3600.0)
    assert history["times"][-1] <= history["now"] < history["times"][-1] + 10
    served = history["models"]["a"]
    assert len(served["requests"]) == len(served["tokens"]) == len(history["times"])
    assert (sum(served["requests"]), sum(served["tokens"])) == (2, 10)  # completion_tokens of each
    assert "b" not in history["models"]  # never asked for
    states = [(s["model"], s["state"]) for s in history["states"]]
    assert states == [
        ("a", "pulling"),
        ("a", "starting"),
        ("a", "ready"),
        ("a", "leaving"),
        ("a", "stopping"),
    ]
    assert all(s["to"] is not None for s in history["states"])  # a is stopped: nothing open
    assert history["gpu"] is None  # no GPU seen


async def test_the_last_hour_needs_a_key_where_the_proxy_has_keys() -> None:
    stack = Stack(apiKeys=["sk-history-1"])
    try:
        assert (await stack.client.get("/history")).status_code == 401
        keyed = await stack.client.get("/history", headers={"authorization": "Bearer sk-history-1"})
        assert keyed.status_code == 200 and keyed.json()["models"] == {}
    finally:
        await stack.close()


async def test_a_request_refused_before_it_is_routed_is_on_record_with_why(stack: Stack) -> None:
    unknown = await stack.chat("gpt-4")
    assert unknown.status_code == 404
    broken = await stack.client.post("/v1/chat/completions", content=b"{not json")
    assert broken.status_code == 400
    nameless = await stack.client.post("/v1/embeddings", json={"input": "hi"})
    assert nameless.status_code == 400
    last, middle, first = await stack.record()
    assert (first["model"], first["status"], first["route"], first["in_flight"]) == (
        "gpt-4",
        404,
        "/v1/chat/completions",
        False,
    )
    assert first["error"] == unknown.json()["error"]["message"] and "gpt-4" in first["error"]
    assert (middle["model"], middle["status"]) == (None, 400)
    assert middle["error"] == broken.json()["error"]["message"]
    assert (last["model"], last["status"], last["route"]) == (None, 400, "/v1/embeddings")
    assert all(r["seconds"] >= 0 and r["swap"] is None and not r["captured"] for r in (first, middle, last))
    assert stack.swapper.running() == []  # nothing was started for them
    assert [r["id"] for r in await stack.record("?model=gpt-4")] == [first["id"]]
