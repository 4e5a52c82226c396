"""Component tests: the proxy app in process, over the fake backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from swapctl.backend.fake import FakeBackend, FakeModel
from swapctl.config import parse_config
from swapctl.proxy import build_app
from swapctl.swapper import Swapper

pytestmark = pytest.mark.anyio

CONFIG = {
    "instance": "test",
    "models": {
        "chat": {"image": "img", "aliases": ["gpt-4o-mini"], "useModelName": "upstream-chat"},
        "code": {"image": "img"},
        "broken": {"image": "img"},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[httpx.AsyncClient, FakeBackend]]:
    backend = FakeBackend()
    backend.behaviour["broken"] = FakeModel(exit_at_start="fatal: no such file /models/x.gguf")
    upstream = httpx.AsyncClient(transport=backend.transport)
    swapper = Swapper(parse_config(CONFIG), backend, upstream)
    app = build_app(swapper)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://swapctl") as client:
        yield client, backend
    await upstream.aclose()


def chat(model: Any, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


def assert_openai_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"]


async def test_alias_resolves_and_use_model_name_rewrites_upstream(
    proxy: tuple[httpx.AsyncClient, FakeBackend],
) -> None:
    client, backend = proxy
    response = await client.post("/v1/chat/completions", json=chat("gpt-4o-mini"))
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "hello from upstream-chat in chat"
    assert backend.running_models() == {"chat"}


async def test_streaming_passes_events_through(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, _ = proxy
    async with client.stream("POST", "/v1/chat/completions", json=chat("code", stream=True)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) == 4


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, ("not valid JSON",)),
        (b"[1, 2]", 400, ("JSON object",)),
        (b'{"messages": []}', 400, ("names no model",)),
        (b'{"model": 7}', 400, ("must be a string",)),
        (b'{"model": "nope"}', 404, ("unknown model 'nope'",)),
    ],
)
async def test_bad_requests_get_openai_errors(
    proxy: tuple[httpx.AsyncClient, FakeBackend], body: bytes, status: int, words: tuple[str, ...]
) -> None:
    client, backend = proxy
    await client.post("/v1/chat/completions", json=chat("code"))
    response = await client.post("/v1/chat/completions", content=body)
    assert_openai_error(response, status, *words)
    assert backend.running_models() == {"code"}  # nothing running is disturbed


async def test_unknown_routes_and_methods(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, _ = proxy
    assert_openai_error(await client.get("/v2/nothing"), 404, "/v2/nothing")
    assert_openai_error(await client.get("/v1/chat/completions"), 405, "GET")


async def test_a_failed_start_names_model_and_cause(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, backend = proxy
    await client.post("/v1/chat/completions", json=chat("code"))
    response = await client.post("/v1/chat/completions", json=chat("broken"))
    assert_openai_error(response, 502, "'broken'", "no such file /models/x.gguf")
    assert backend.running_models() == set()  # one at a time: code was stopped for it


async def test_models_running_and_unload(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, backend = proxy
    listed = (await client.get("/v1/models")).json()
    assert [m["id"] for m in listed["data"]] == ["chat", "code", "broken"]
    assert listed["data"][0]["aliases"] == ["gpt-4o-mini"]
    await client.post("/v1/chat/completions", json=chat("chat"))
    running = (await client.get("/running")).json()
    assert [(m["model"], m["state"]) for m in running["running"]] == [("chat", "ready")]
    assert_openai_error(await client.post("/unload/nope"), 404, "nope")
    assert (await client.post("/unload/gpt-4o-mini")).json() == {"unloaded": ["chat"]}
    assert backend.running_models() == set()
    assert (await client.get("/health")).text == "OK"


async def test_a_crashed_model_answers_an_error_then_restarts(
    proxy: tuple[httpx.AsyncClient, FakeBackend],
) -> None:
    client, backend = proxy
    await client.post("/v1/chat/completions", json=chat("code"))
    backend.crash("code")
    assert_openai_error(await client.post("/v1/chat/completions", json=chat("code")), 503, "'code'")
    response = await client.post("/v1/chat/completions", json=chat("code"))
    assert response.status_code == 200
    assert backend.starts["code"] == 2
