"""No request meets a traceback: malformed input is a 400 that starts nothing, and a client
that leaves is forgotten quietly. Component tests over the fake backend, plus a fuzz test."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import ASGIApp, Message
from support import FakeStack, asgi_scope

from swapctl.backend.fake import FakeContainer, FakeModel

pytestmark = pytest.mark.anyio

CONFIG = {
    "instance": "test",
    "maxRequestBytes": 2**20,
    "models": {
        "chat": {"image": "img", "useModelName": "upstream-chat"},
        "slow": {"image": "img"},
        "other": {"image": "img"},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Harness(FakeStack):
    def __init__(self) -> None:
        super().__init__(CONFIG)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    found = Harness()
    yield found
    await found.close()


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


def form(boundary: str, *parts: tuple[str, bytes]) -> bytes:
    body = b""
    for name, value in parts:
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        body += value + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(
    ("body", "content_type", "code"),
    [
        (b'{"model": "chat", "n": ' + b"9" * 5000 + b"}", "application/json", "invalid_json"),
        (b"[" * 50_000 + b"]" * 50_000, "application/json", "invalid_json"),
        (
            b'{"model": "chat", "x": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_001,
            "application/json",
            "invalid_json",
        ),
        (b"\xff\xfe{}", "application/json", "invalid_json"),
        (form("b", ("model", b"chat")), "multipart/form-data", "invalid_form"),
        (form("b", ("model", b"chat")), "multipart/form-data; boundary=zz", "invalid_form"),
        (form("b", ("file", b"x")), "multipart/form-data; boundary=b", "missing_model"),
        (b"--b\r\nno colon here\r\n\r\nchat\r\n--b--\r\n", "multipart/form-data; boundary=b", "invalid_form"),
        (form("b", ("model", b"chat"))[:-20], "multipart/form-data; boundary=b", "missing_model"),
    ],
)
async def test_a_malformed_body_is_a_400_that_starts_nothing(
    harness: Harness, caplog: pytest.LogCaptureFixture, body: bytes, content_type: str, code: str
) -> None:
    headers = {"content-type": content_type}
    response = await harness.client.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert harness.backend.starts == {}
    no_tracebacks(caplog)


async def test_an_odd_passthrough_path_is_forwarded_quoted(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    response = await harness.client.get("/upstream/chat/%00x%3Fy?z=1")
    assert response.status_code == 200
    assert response.json()["path"] == "/\x00x?y"  # as the upstream decodes it: '?' stays in the path
    assert response.json()["query"] == "z=1"
    no_tracebacks(caplog)


async def call(
    app: ASGIApp, messages: list[Message], path: str = "/v1/chat/completions", leave_after: float = 0.0
) -> list[Message]:
    """Drive the app as a server would: `messages` as the request, then (after `leave_after`
    seconds) the client goes away. What the app sent back."""
    scope = asgi_scope(path)
    pending = list(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(leave_after)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), timeout=20)
    return sent


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()


async def test_a_dropped_upload_starts_nothing(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "swapctl")
    half = {"type": "http.request", "body": chat_body("chat")[:10], "more_body": True}
    await call(harness.app, [half])
    assert harness.backend.starts == {}
    no_tracebacks(caplog)
    assert sum("went away" in r.getMessage() for r in caplog.records) == 1


async def test_a_client_that_leaves_while_its_model_starts_is_forgotten(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "swapctl")
    harness.backend.behaviour["slow"] = FakeModel(ready_after=0.5)
    whole = {"type": "http.request", "body": chat_body("slow"), "more_body": False}
    sent = await call(harness.app, [whole], leave_after=0.1)
    assert not any(m["type"] == "http.response.body" and m.get("body") for m in sent)
    assert harness.swapper.slots["slow"].in_flight == 0  # released at once, not when the start ends
    no_tracebacks(caplog)
    assert sum("went away" in r.getMessage() for r in caplog.records) == 1


async def test_a_client_that_leaves_before_a_slow_answer_cancels_the_upstream_request(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "swapctl")
    cancelled = asyncio.Event()

    async def slow(request: httpx.Request, box: FakeContainer) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return httpx.Response(200, json={})

    harness.backend.behaviour["slow"] = FakeModel(handler=slow)
    whole = {"type": "http.request", "body": chat_body("slow"), "more_body": False}
    await call(harness.app, [whole], leave_after=0.2)
    assert cancelled.is_set()
    assert harness.swapper.slots["slow"].in_flight == 0
    no_tracebacks(caplog)


# --- fuzz ---------------------------------------------------------------------------------

PATHS = [
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/audio/transcriptions",
    "/upstream/chat/",
    "/upstream/",
    "/unload/",
    "/logs/",
    "/v1/models",
    "/running",
    "/",
]
TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


@st.composite
def bodies(draw: Callable[..., Any]) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["json", "model-json", "bytes", "form"]))
    if kind == "json":
        return json.dumps(draw(json_values())).encode(), "application/json"
    if kind == "model-json":
        model = draw(st.sampled_from(["chat", "other", "nope", ""]) | st.text(max_size=8))
        payload = {"model": model, "extra": draw(json_values())}
        return json.dumps(payload).encode(), "application/json"
    if kind == "bytes":
        return draw(st.binary(max_size=200)), draw(st.sampled_from(["application/json", "text/plain", ""]))
    boundary = draw(TOKEN)
    parts = draw(st.lists(st.tuples(TOKEN | st.just("model"), st.binary(max_size=40)), max_size=3))
    body = form(boundary, *parts)
    if draw(st.booleans()):  # damage it somewhere
        at = draw(st.integers(0, max(0, len(body) - 1)))
        body = body[:at] + draw(st.binary(min_size=1, max_size=8)) + body[at + 1 :]
    return body, f"multipart/form-data; boundary={draw(TOKEN | st.just(boundary))}"


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]),
    path=st.sampled_from(PATHS),
    suffix=st.text(max_size=12),
    query=st.dictionaries(st.sampled_from(["model", "timeout", "x"]), st.text(max_size=8), max_size=2),
    body=bodies(),
    headers=st.dictionaries(TOKEN, HEADER_VALUE, max_size=3),
)
def test_fuzz_no_input_gets_a_500_or_a_traceback(
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    suffix: str,
    query: dict[str, str],
    body: tuple[bytes, str],
    headers: dict[str, str],
) -> None:
    content, content_type = body
    caplog.clear()

    async def run() -> httpx.Response:
        harness = Harness()
        try:
            return await harness.client.request(
                method,
                path + quote(suffix, safe="/%"),  # any path a client can send, odd escapes included
                params=query,
                content=content,
                headers={**headers, "content-type": content_type},
            )
        finally:
            await harness.swapper.unload()
            await harness.close()

    response = asyncio.run(run())
    assert response.status_code < 500, (response.status_code, response.text)
    no_tracebacks(caplog)
