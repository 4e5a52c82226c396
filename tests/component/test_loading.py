"""Loading feedback over the fake backend: a streamed request for a model that is not ready
gets its head at once, notes of progress while it waits, then the answer in the same body.

The app is driven as a server drives it (ASGI messages, each stamped with the time and the
model's state when it was sent): an in-process HTTP transport would buffer the body."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.types import Message
from support import FakeStack, asgi_scope

from swapctl.backend.fake import FakeContainer, FakeModel
from swapctl.config import parse_config
from swapctl.lifecycle import State, Step

pytestmark = pytest.mark.anyio

TICK = 0.05
CONFIG: dict[str, Any] = {
    "instance": "test",
    "models": {  # one model at a time: each start evicts the model that runs
        "slow": {"image": "img", "concurrencyLimit": 1},
        "other": {"image": "img"},
        "told": {"image": "img", "sendLoadingState": True},
        "broken": {"image": "img"},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Harness(FakeStack):
    def __init__(self, config: dict[str, Any] = CONFIG) -> None:
        super().__init__(config, tick=TICK)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    found = Harness()
    yield found
    await found.close()


@dataclass
class Sent:
    """What the app sent for one request: the head, the body's pieces, and when."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    head_at: float = 0.0
    phase_at_head: State | None = None  # the model's state when the head went out
    pieces: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(piece for _, piece in self.pieces)

    @property
    def comments(self) -> list[str]:
        return [line for line in self.body.decode().split("\n") if line.startswith(":")]

    @property
    def events(self) -> list[Any]:
        """The data of each event, parsed ([DONE] as the string)."""
        lines = self.body.decode().split("\n")
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        return [line if line == "[DONE]" else json.loads(line) for line in data]

    def reasoning(self) -> str:
        return "".join(
            choice["delta"].get("reasoning_content", "")
            for event in self.events
            if isinstance(event, dict)
            for choice in event.get("choices", [])
        )

    def content(self) -> str:
        return "".join(
            choice["delta"].get("content") or ""
            for event in self.events
            if isinstance(event, dict)
            for choice in event.get("choices", [])
        )


def chat_body(model: str, stream: bool = True) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    ).encode()


async def drive(
    harness: Harness, model: str, body: bytes | None = None, leave_after: float | None = None
) -> Sent:
    """Send one chat completion as a server would; the client leaves after `leave_after`
    seconds if given, else once the answer is over."""
    path = "/v1/chat/completions"
    scope = asgi_scope(path)
    request = {"type": "http.request", "body": body or chat_body(model), "more_body": False}
    pending = [request]
    sent = Sent()

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        if leave_after is None:
            await asyncio.Event().wait()  # until the app stops listening
        await asyncio.sleep(leave_after or 0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        now = time.perf_counter()
        if message["type"] == "http.response.start":
            sent.status, sent.head_at = message["status"], now
            sent.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            slot = harness.swapper.slots.get(model)
            sent.phase_at_head = slot.phase if slot else None
        elif message.get("body"):
            sent.pieces.append((now, message["body"]))

    await asyncio.wait_for(harness.app(scope, receive, send), timeout=20)
    return sent


def metric(harness: Harness, line: str) -> bool:
    return line in harness.swapper.metrics.render().decode()


async def test_a_cold_stream_opens_at_once_and_the_answer_follows(harness: Harness) -> None:
    harness.backend.behaviour["slow"] = FakeModel(ready_after=0.4)
    began = time.perf_counter()
    sent = await drive(harness, "slow")
    assert sent.status == 200
    assert sent.phase_at_head in (
        State.PULLING,
        State.STARTING,
    )  # the head went out before the model was ready
    assert sent.head_at - began < 0.2
    assert sent.headers["content-type"].startswith("text/event-stream")
    assert sent.headers["cache-control"] == "no-cache"
    assert sent.headers["x-accel-buffering"] == "no"
    assert len(sent.comments) >= 4  # one at once, then one each tick
    assert all(c.startswith(": loading slow ") and c.endswith("s") for c in sent.comments)
    assert sent.pieces[0][1].startswith(b": loading slow ")  # the first byte is a note
    assert sent.content() == "hello from slow"
    assert sent.events[-1] == "[DONE]"
    assert harness.swapper.slots["slow"].in_flight == 0
    assert metric(harness, 'swapctl_requests_total{code="200",model="slow"} 1.0')


async def test_a_ready_model_streams_as_before_with_no_comments(harness: Harness) -> None:
    await harness.use("slow")
    sent = await drive(harness, "slow")
    assert sent.status == 200
    assert sent.comments == []
    assert sent.body.startswith(b"data: ")
    assert sent.headers["x-accel-buffering"] == "no"  # every event stream passed on says so
    assert sent.content() == "hello from slow"


async def test_a_cold_request_that_is_not_streamed_waits_before_its_head(harness: Harness) -> None:
    harness.backend.behaviour["slow"] = FakeModel(ready_after=0.2)
    sent = await drive(harness, "slow", chat_body("slow", stream=False))
    assert sent.status == 200
    assert sent.phase_at_head is State.READY
    assert json.loads(sent.body)["choices"][0]["message"]["content"] == "hello from slow in slow"


async def test_send_loading_state_tells_the_wait_as_reasoning_content(harness: Harness) -> None:
    harness.backend.behaviour["told"] = FakeModel(ready_after=0.3)
    await harness.use("other")
    sent = await drive(harness, "told")
    assert sent.comments == []
    chunks = [
        e for e in sent.events if isinstance(e, dict) and e["choices"][0]["delta"].get("reasoning_content")
    ]
    assert len(chunks) >= 3
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "told" for c in chunks)
    reasoning = sent.reasoning()
    assert reasoning.startswith("Loading told: no start of it measured yet")
    assert "Stopping other to make room" in reasoning
    assert "Starting its container" in reasoning
    assert "Waking" not in reasoning  # a cold start: nothing sleeps
    assert "waiting for the model to load" in reasoning
    assert "told is ready after" in reasoning
    assert sent.content() == "hello from told"  # then the real answer
    assert harness.backend.running_models() == {"told"}

    await harness.swapper.unload("told")
    again = await drive(harness, "told")
    last = harness.swapper.last_starts("told")
    assert len(last) == 2
    assert f"about {last[0]:.0f}s (last starts {last[0]:.1f}s)" in again.reasoning()
    assert "Stopping" not in again.reasoning()  # nothing ran in its way


async def test_send_loading_state_is_for_chat_completions_only(harness: Harness) -> None:
    harness.backend.behaviour["told"] = FakeModel(ready_after=0.2)
    request = harness.client.post("/v1/completions", json={"model": "told", "prompt": "x", "stream": True})
    response = await request  # buffered whole: enough to see what it carried
    assert response.text.startswith(": loading told ")
    assert "reasoning_content" not in response.text


@pytest.mark.parametrize(
    ("global_", "own", "told"),
    [(None, None, False), (True, None, True), (True, False, False), (False, True, True), (None, True, True)],
)
def test_send_loading_state_resolves_once_per_model(
    global_: bool | None, own: bool | None, told: bool
) -> None:
    model: dict[str, Any] = {"image": "img"} if own is None else {"image": "img", "sendLoadingState": own}
    raw: dict[str, Any] = {"models": {"m": model}}
    if global_ is not None:
        raw["sendLoadingState"] = global_
    assert parse_config(raw).models["m"].send_loading_state is told


async def test_a_failed_start_ends_the_stream_with_an_error_event(harness: Harness) -> None:
    harness.backend.behaviour["broken"] = FakeModel(exit_at_start="fatal: no such file /models/x.gguf")
    plain = await harness.client.post("/v1/chat/completions", json={"model": "broken", "messages": []})
    assert plain.status_code == 502
    sent = await drive(harness, "broken")
    assert sent.status == 200
    assert sent.comments  # the head and a note went out first
    error = sent.events[-1]["error"]
    assert error == plain.json()["error"]  # what the plain request got as a 502
    assert error["code"] == "model_start_failed"
    assert "no such file /models/x.gguf" in error["message"]
    assert "[DONE]" not in sent.events  # an error event ends it: never taken for complete
    assert harness.swapper.slots["broken"].in_flight == 0
    assert metric(harness, 'swapctl_requests_total{code="502",model="broken"} 2.0')


async def test_an_upstream_refusal_after_the_wait_is_an_error_event_with_its_status(harness: Harness) -> None:
    async def refusing(request: httpx.Request, box: FakeContainer) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200 if box.ready else 503)
        return httpx.Response(400, json={"error": {"message": "the prompt is too long", "code": 400}})

    harness.backend.behaviour["slow"] = FakeModel(ready_after=0.1, handler=refusing)
    sent = await drive(harness, "slow")
    assert sent.status == 200
    error = sent.events[-1]["error"]
    assert error["status"] == 400 and error["code"] == "upstream_400"
    assert error["message"] == "model 'slow': its server answered 400: the prompt is too long"
    assert metric(harness, 'swapctl_requests_total{code="400",model="slow"} 1.0')
    assert harness.swapper.slots["slow"].in_flight == 0


async def test_a_client_that_leaves_while_loading_is_forgotten(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "swapctl")
    harness.backend.behaviour["slow"] = FakeModel(ready_after=1.0)
    sent = await drive(harness, "slow", leave_after=0.2)
    assert sent.status == 200 and sent.comments  # it had its head and notes
    slot = harness.swapper.slots["slow"]
    assert slot.phase is State.STARTING  # the start goes on, for whoever comes next
    assert slot.in_flight == 0  # released at once, not when the start ends
    assert sum("the client went away (slow)" in r.getMessage() for r in caplog.records) == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert metric(harness, 'swapctl_requests_total{code="499",model="slow"} 1.0')


async def test_errors_before_the_wait_stay_plain_answers(harness: Harness) -> None:
    harness.backend.behaviour["slow"] = FakeModel(ready_after=0.5)
    waiting = asyncio.create_task(drive(harness, "slow"))  # concurrencyLimit 1: it takes the place
    await asyncio.sleep(0.1)
    busy = await harness.client.post("/v1/chat/completions", content=chat_body("slow"))
    assert busy.status_code == 429
    assert busy.headers["content-type"] == "application/json"
    assert busy.json()["error"]["code"] == "model_busy"
    unknown = await harness.client.post("/v1/chat/completions", content=chat_body("nope"))
    assert unknown.status_code == 404
    bad = await harness.client.post("/v1/chat/completions", content=b'{"model": "slow", "stream": true')
    assert bad.status_code == 400
    assert (await waiting).content() == "hello from slow"


async def test_the_swapper_tells_how_far_a_start_has_come(harness: Harness) -> None:
    harness.backend.behaviour["slow"] = FakeModel(ready_after=0.3)
    await harness.use("other")
    assert harness.swapper.progress("other") is None  # ready: nothing to tell
    ticket = await harness.swapper.admit("slow")
    assert not ticket.ready
    seen = harness.swapper.progress("slow")
    assert seen is not None and seen.step is Step.EVICTING and seen.evicting == ("other",)
    assert seen.estimate is None and seen.last_starts == ()
    await asyncio.sleep(0.1)
    seen = harness.swapper.progress("slow")
    assert seen is not None and seen.step is Step.LOADING and seen.elapsed >= 0.1
    await (await ticket.lease()).release()
    assert harness.swapper.progress("slow") is None
    (took,) = harness.swapper.last_starts("slow")
    assert 0.3 <= took < 1
    assert harness.swapper.slots["slow"].in_flight == 0
