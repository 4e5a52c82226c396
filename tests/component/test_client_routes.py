"""Every client's routes: Anthropic's Messages API with its errors in Anthropic's shape,
llama.cpp's own routes with the model from the body or `?model=`, and the request filters,
checked against what the model's server received. Over the fake backend; the real
llama-server and the official SDKs meet them in tests/real/test_clients.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
from support import FakeStack

from swapctl.backend.fake import FakeContainer, FakeModel

pytestmark = pytest.mark.anyio
KEY = "sk-client-routes-1"

CONFIG: dict[str, Any] = {
    "instance": "test",
    "models": {
        "chat": {
            "image": "img",
            "aliases": ["claude-sonnet"],
            "filters": {
                "stripParams": "top_p, metadata.user_id",
                "setParams": {"top_k": 40, "temperature?": 0.6},
                "setParamsByID": {"chat:think": {"chat_template_kwargs.enable_thinking": True}},
            },
        },
        "named": {"image": "img", "useModelName": "org/named-7b", "filters": {"setParams": {"seed": 7}}},
        "plain": {"image": "img"},
        "broken": {"image": "img"},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def report(request: httpx.Request, box: FakeContainer) -> httpx.Response:
    """A server that answers every request with what it received: method, path, query, body."""
    if request.url.path == "/health":
        return httpx.Response(200)
    raw = await request.aread()
    seen: dict[str, Any] = {
        "method": request.method,
        "path": request.url.path,
        "query": request.url.query.decode(),
    }
    seen["body"] = json.loads(raw) if raw.strip() else None
    return httpx.Response(200, json=seen)


@pytest.fixture
async def stack() -> AsyncIterator[FakeStack]:
    found = FakeStack(CONFIG)
    for model in ("chat", "named", "plain"):
        found.backend.behaviour[model] = FakeModel(handler=report)
    found.backend.behaviour["broken"] = FakeModel(exit_at_start="fatal: no weights")
    yield found
    await found.close()


@pytest.mark.parametrize(
    "path",
    [
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/completion",
        "/completions",
        "/infill",
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/embedding",
        "/embeddings",
        "/reranking",
    ],
)
async def test_each_route_takes_its_model_from_the_body(stack: FakeStack, path: str) -> None:
    answer = await stack.client.post(path, json={"model": "plain", "content": "hi"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "method": "POST",
        "path": path,
        "query": "",
        "body": {"model": "plain", "content": "hi"},
    }


async def test_without_a_model_in_the_body_the_query_names_it(stack: FakeStack) -> None:
    answer = await stack.client.post("/tokenize?model=plain", json={"content": "hi"})
    assert answer.json()["body"] == {"content": "hi"}  # nothing added to the body
    assert answer.json()["query"] == "model=plain"
    bare = await stack.client.post("/props?model=plain")  # llama.cpp's GET-like routes, POSTed bare
    assert bare.status_code == 200 and bare.json()["path"] == "/props"
    props = await stack.client.get("/props", params={"model": "plain"})
    assert props.json()["method"] == "GET"
    missing = await stack.client.post("/tokenize", json={"content": "hi"})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_model"


async def test_filters_change_what_the_server_receives(stack: FakeStack) -> None:
    body = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "top_p": 0.1,
        "top_k": 2,
        "metadata": {"user_id": "u1", "keep": 1},
    }
    seen = (await stack.client.post("/v1/chat/completions", json=body)).json()["body"]
    # stripped (a dotted key reaches into the object), forced, and the soft default filled in
    assert seen == {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "top_k": 40,
        "metadata": {"keep": 1},
        "temperature": 0.6,
    }
    # the request's own value wins over a soft default
    warm = (await stack.client.post("/v1/chat/completions", json={**body, "temperature": 1.5})).json()["body"]
    assert warm["temperature"] == 1.5


async def test_set_params_by_id_serves_one_model_under_several_ids_without_a_swap(stack: FakeStack) -> None:
    plain = (await stack.client.post("/v1/messages", json={"model": "chat", "max_tokens": 4})).json()["body"]
    assert "chat_template_kwargs" not in plain
    starts = len(stack.backend.boxes)
    think = await stack.client.post("/v1/messages", json={"model": "chat:think", "max_tokens": 4})
    assert think.json()["body"]["chat_template_kwargs"] == {"enable_thinking": True}
    assert think.json()["body"]["model"] == "chat:think"  # as with an alias: the name as sent
    assert len(stack.backend.boxes) == starts  # the same container: no swap between two IDs
    upstream = await stack.client.get("/upstream/chat:think/props")  # routable everywhere an ID is
    assert upstream.json()["path"] == "/props"


async def test_use_model_name_and_filters_together(stack: FakeStack) -> None:
    seen = (await stack.client.post("/v1/completions", json={"model": "named", "prompt": "x"})).json()["body"]
    assert seen == {"model": "org/named-7b", "prompt": "x", "seed": 7}


async def test_multipart_forms_are_not_filtered(stack: FakeStack) -> None:
    """Documented: filters change JSON bodies only; a form's fields pass untouched."""
    boundary = "b0undary"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nchat\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="top_p"\r\n\r\n0.1\r\n--{boundary}--\r\n'
    ).encode()
    seen: list[bytes] = []

    async def keep(request: httpx.Request, box: FakeContainer) -> httpx.Response:
        seen.append(await request.aread())
        return httpx.Response(200, json={"text": ""})

    stack.backend.behaviour["chat"] = FakeModel(handler=keep)
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    answer = await stack.client.post("/v1/audio/transcriptions", content=form, headers=headers)
    assert answer.status_code == 200
    assert seen[-1] == form


# --- Anthropic's shape ----------------------------------------------------------------------


def sdk(stack: FakeStack, api_key: str = KEY) -> anthropic.AsyncAnthropic:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=stack.app))  # the SDK's own httpx
    return anthropic.AsyncAnthropic(
        base_url="http://127.0.0.1", api_key=api_key, http_client=http, max_retries=0
    )


async def test_errors_on_anthropics_routes_are_anthropics(stack: FakeStack) -> None:
    answer = await stack.client.post("/v1/messages", json={"model": "nope", "max_tokens": 4, "messages": []})
    assert answer.status_code == 404
    assert answer.json() == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "unknown model 'nope'"},
    }
    bad = await stack.client.post(
        "/v1/messages/count_tokens", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    failed = await stack.client.post(
        "/v1/messages", json={"model": "broken", "max_tokens": 4, "messages": []}
    )
    assert failed.status_code == 502
    assert failed.json()["type"] == "error" and failed.json()["error"]["type"] == "api_error"
    assert "broken" in failed.json()["error"]["message"]
    # OpenAI's routes keep OpenAI's shape
    openai = await stack.client.post("/v1/chat/completions", json={"model": "nope"})
    assert openai.json()["error"]["code"] == "model_not_found"


async def test_the_anthropic_sdk_raises_its_own_exceptions(stack: FakeStack) -> None:
    async with sdk(stack) as client:
        with pytest.raises(anthropic.NotFoundError, match="unknown model 'nope'"):
            await client.messages.create(
                model="nope", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(anthropic.InternalServerError, match="broken"):
            await client.messages.count_tokens(model="broken", messages=[{"role": "user", "content": "hi"}])


async def test_a_key_refused_on_anthropics_routes_is_an_authentication_error() -> None:
    stack = FakeStack({**CONFIG, "apiKeys": [KEY]})
    try:
        refused = await stack.client.post("/v1/messages", json={"model": "plain"})
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        async with sdk(stack, api_key="wrong") as wrong:
            with pytest.raises(anthropic.AuthenticationError):
                await wrong.messages.count_tokens(model="plain", messages=[{"role": "user", "content": "hi"}])
        # Anthropic's clients send x-api-key: it is swapctl's, and never reaches the model
        ok = await stack.client.post("/v1/messages", json={"model": "plain"}, headers={"x-api-key": KEY})
        assert ok.status_code == 200
    finally:
        await stack.close()


async def test_a_cold_anthropic_stream_that_fails_ends_in_an_anthropic_error_event(stack: FakeStack) -> None:
    body = {
        "model": "broken",
        "max_tokens": 4,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with stack.client.stream("POST", "/v1/messages", json=body) as answer:
        assert answer.status_code == 200  # the head went out before the start failed
        text = (await answer.aread()).decode()
    events = [block for block in text.split("\n\n") if block.strip()]
    assert all(block.startswith(":") for block in events[:-1])  # loading notes are comments
    kind, data = events[-1].split("\n", 1)
    assert kind == "event: error"
    error = json.loads(data.removeprefix("data: "))
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
    assert "broken" in error["error"]["message"]
    async with sdk(stack) as client:
        stream = await client.messages.create(
            model="broken", max_tokens=4, stream=True, messages=[{"role": "user", "content": "hi"}]
        )
        with pytest.raises(anthropic.APIStatusError, match="broken"):
            await anext(aiter(stream))
