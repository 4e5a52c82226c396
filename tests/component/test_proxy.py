"""Component tests: the proxy app in process, over the fake backend."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from swapctl.backend.fake import FakeBackend, FakeContainer, FakeModel
from swapctl.config import parse_config
from swapctl.lifecycle import Swapper
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream

pytestmark = pytest.mark.anyio

CONFIG = {
    "instance": "test",
    "maxRequestBytes": 2**20,
    "models": {
        "chat": {"image": "img", "aliases": ["gpt-4o-mini"], "useModelName": "upstream-chat"},
        "code": {"image": "img", "concurrencyLimit": 2},
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
    app = build_app(swapper.config, swapper, HttpxUpstream(upstream), swapper.metrics)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
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


async def test_a_crashed_model_restarts_for_the_next_request(
    proxy: tuple[httpx.AsyncClient, FakeBackend],
) -> None:
    client, backend = proxy
    await client.post("/v1/chat/completions", json=chat("code"))
    backend.crash("code")
    # the request finds the container dead before reaching it: the model starts again for it
    response = await client.post("/v1/chat/completions", json=chat("code"))
    assert response.status_code == 200
    assert backend.starts["code"] == 2


async def test_multipart_uploads_stream_through_untouched(
    proxy: tuple[httpx.AsyncClient, FakeBackend],
) -> None:
    client, _ = proxy
    audio = bytes(range(256)) * 4000  # 1 MB
    request = client.build_request(
        "POST",
        "/v1/audio/transcriptions",
        data={"model": "code", "language": "en"},
        files={"file": ("a.wav", audio)},
    )
    sent = request.read()
    response = await client.send(request)
    seen = response.json()
    assert (seen["served_by"], seen["path"], seen["bytes"]) == ("code", "/v1/audio/transcriptions", len(sent))
    assert seen["sha256"] == hashlib.sha256(sent).hexdigest()


async def test_multipart_model_is_rewritten_for_upstream(
    proxy: tuple[httpx.AsyncClient, FakeBackend],
) -> None:
    client, _ = proxy
    response = await client.post(
        "/v1/audio/transcriptions", data={"model": "gpt-4o-mini"}, files={"file": b"x"}
    )
    seen = response.json()
    assert seen["served_by"] == "chat"
    assert seen["bytes"] > 0
    form = await client.post("/v1/audio/transcriptions", files={"file": b"no model field"})
    assert_openai_error(form, 400, "no 'model' field")


async def test_upstream_passthrough_and_model_query(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, _ = proxy
    seen = (await client.put("/upstream/code/props/x?y=1", content=b"abc")).json()
    assert (seen["served_by"], seen["method"], seen["path"], seen["query"], seen["bytes"]) == (
        "code",
        "PUT",
        "/props/x",
        "y=1",
        3,
    )
    seen = (await client.get("/slots", params={"model": "gpt-4o-mini"})).json()
    assert (seen["served_by"], seen["path"]) == ("chat", "/slots")
    assert_openai_error(await client.get("/upstream/nope/x"), 404, "nope")


async def test_oversized_bodies_are_refused(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, backend = proxy
    await client.post("/v1/chat/completions", json=chat("code"))
    huge = json.dumps(chat("code", padding="x" * (2 * 2**20))).encode()
    assert_openai_error(await client.post("/v1/chat/completions", content=huge), 413, "maxRequestBytes")

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * 2**20

    assert_openai_error(await client.post("/upstream/code/upload", content=chunked()), 413, "maxRequestBytes")
    assert backend.running_models() == {"code"}
    assert (await client.get("/running")).json()["running"][0]["in_flight"] == 0


async def test_concurrency_limit_answers_429(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, backend = proxy
    gate = asyncio.Event()

    async def slow(request: httpx.Request, box: FakeContainer) -> httpx.Response:
        if request.url.path != "/health":
            await gate.wait()
        return httpx.Response(200, json={"ok": True})

    backend.behaviour["code"] = FakeModel(handler=slow)
    first = [asyncio.create_task(client.post("/v1/chat/completions", json=chat("code"))) for _ in range(2)]
    await asyncio.sleep(0.2)
    refused = await client.post("/v1/chat/completions", json=chat("code"))
    assert_openai_error(refused, 429, "'code' is busy")
    assert refused.headers["retry-after"] == "1"
    gate.set()
    assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]


async def test_per_model_metrics(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, _ = proxy
    await client.post("/v1/chat/completions", json=chat("code"))
    await client.post("/v1/chat/completions", json=chat("code"))
    await client.post("/v1/chat/completions", json=chat("broken"))
    text = (await client.get("/metrics")).text
    for line in (
        'swapctl_requests_total{code="200",model="code"} 2.0',
        'swapctl_requests_total{code="502",model="broken"} 1.0',
        'swapctl_model_starts_total{model="code",result="ready"} 1.0',
        'swapctl_model_starts_total{model="broken",result="failed"} 1.0',
        'swapctl_model_evictions_total{model="code"} 1.0',
        'swapctl_model_state{model="broken",state="stopped"} 1.0',
        'swapctl_model_in_flight{model="code"} 0.0',
        'swapctl_request_duration_seconds_count{model="code"} 2.0',
    ):
        assert line in text, line


async def test_logs_of_a_model_container(proxy: tuple[httpx.AsyncClient, FakeBackend]) -> None:
    client, backend = proxy
    await client.post("/v1/chat/completions", json=chat("code"))
    next(iter(backend.boxes.values())).log.append("llama server listening")
    assert (await client.get("/logs/code")).text == "llama server listening"
    assert (await client.get("/logs/chat")).text == ""
    assert_openai_error(await client.get("/logs/nope"), 404, "nope")


async def test_a_stream_that_breaks_off_ends_with_an_error_event(
    proxy: tuple[httpx.AsyncClient, FakeBackend],
) -> None:
    client, backend = proxy

    async def events() -> AsyncIterator[bytes]:
        yield b'data: {"n": 1}\n\ndata: {"n": 2}\n\nda'
        yield b'ta: {"n": 3, "cut": '
        raise httpx.ReadError("connection reset by peer")

    async def breaking(request: httpx.Request, box: FakeContainer) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=events())

    backend.behaviour["code"] = FakeModel(handler=breaking)
    async with client.stream("POST", "/v1/chat/completions", json=chat("code", stream=True)) as response:
        # a cold model: SSE comments (`: loading code 0.0s`) come first, which clients ignore
        lines = [line async for line in response.aiter_lines() if line and not line.startswith(":")]
    assert lines[:2] == ['data: {"n": 1}', 'data: {"n": 2}']
    assert len(lines) == 3  # the broken third event is dropped, not passed on half
    error = json.loads(lines[2].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_broke_off"
    assert "'code'" in error["message"]
