"""Component tests: `swapctl up`'s server shutting down (as on Ctrl-C) while requests wait for
a model that is still starting. Those the grace did not see answered get an OpenAI error
naming the model, not a bare 500, and the log gets no traceback.

The app runs under the real uvicorn server that `up` builds, on 127.0.0.1, over the fake
engine (an in-process transport knows nothing of a server's shutdown)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from support import FakeStack

from swapctl.backend.fake import FakeBackend, FakeModel
from swapctl.lifecycle import State
from swapctl.server import build_server

pytestmark = pytest.mark.anyio
CONFIG = {"instance": "shutdown", "models": {"slow": {"image": "img"}, "quick": {"image": "img"}}}
GRACE = 1  # second the server waits for requests in flight before it gives up on them


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def stack() -> AsyncIterator[FakeStack]:
    backend = FakeBackend()
    backend.behaviour["slow"] = FakeModel(ready_after=3600)  # starts, never ready
    found = FakeStack(CONFIG, backend, preload=False)
    yield found
    for task in list(found.swapper.tasks):  # the start that never ends
        task.cancel()
    await found.close()


async def shut_down_while(
    stack: FakeStack, method: str, path: str, body: dict[str, object]
) -> httpx.Response:
    """The answer to a request sent to the served app, which is shut down while the request
    waits for its model."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    url = f"http://127.0.0.1:{listening.getsockname()[1]}"
    server = build_server(stack.app, "127.0.0.1", 0, verbose=False, closing=stack.swapper.activity.close)
    server.config.timeout_graceful_shutdown = GRACE
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            request = asyncio.create_task(client.request(method, path, json=body))
            while stack.swapper.slots["slow"].state is not State.STARTING:
                await asyncio.sleep(0.01)
            server.should_exit = True
            answer = await request
            await answer.aread()
    finally:
        server.should_exit = True
        await serving
        listening.close()
    return answer


def assert_shutting_down(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "shutting_down")
    assert "'slow'" in error["message"] and "shutting down" in error["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings?x=1"), ("GET", "/v1/things?model=slow")],
)
async def test_a_request_still_waiting_after_the_grace_gets_a_503_naming_its_model(
    stack: FakeStack, caplog: pytest.LogCaptureFixture, method: str, path: str
) -> None:
    answer = await shut_down_while(stack, method, path, {"model": "slow", "messages": []})
    assert_shutting_down(answer)
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text


async def test_a_streamed_request_still_waiting_after_the_grace_ends_with_an_error_event(
    stack: FakeStack, caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": "slow", "messages": [], "stream": True}
    answer = await shut_down_while(stack, "POST", "/v1/chat/completions", body)
    assert answer.status_code == 200  # the head went out before the wait
    last = [line for line in answer.text.splitlines() if line.startswith("data: ")][-1]
    error = json.loads(last.removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "'slow'" in error["message"]
    assert "Traceback" not in caplog.text and "Exception in ASGI application" not in caplog.text
