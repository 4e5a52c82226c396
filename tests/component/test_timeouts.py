"""A model's `timeouts` on the forwarding path: a server that sends no head within
`responseHeader` gets its client a 504 naming the model and the limit; a body that pauses past
`idle` ends (an event stream with an error event); either way the connection is closed, the
request's hold released, and the model stays up. First the HTTP/1.1 client against scripted
servers on 127.0.0.1, then the proxy over the fake engine (through `HttpxUpstream`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from support import FakeStack

from swapctl.backend.fake import FakeContainer, FakeModel
from swapctl.config import Timeouts
from swapctl.proxy.http1 import Http1Upstream
from swapctl.proxy.upstream import BrokeOff, Stalled, TimedOut

pytestmark = pytest.mark.anyio
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMIT = 0.2  # seconds: the limit under test
UNLIMITED = Timeouts(connect=10.0, response_header=None, idle=None)
EVENT = b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- the HTTP/1.1 client ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def server(script: Script) -> AsyncIterator[tuple[str, list[str]]]:
    """A server running `script` per connection; yields its URL and what became of each
    connection: `closed` once the client closed it."""
    fates: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fates.append("open")
        number = len(fates) - 1
        try:
            await script(reader, writer)
            while await reader.read(1024):  # until the client closes it
                pass
            fates[number] = "closed"
        except ConnectionError:
            fates[number] = "closed"
        finally:
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", fates
    finally:
        listening.close()


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")  # the request, never answered


async def two_events_then_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    writer.write(head + b"".join(b"%x\r\n%s\r\n" % (len(EVENT), EVENT) for _ in range(2)))
    await writer.drain()


async def read_into(got: list[bytes], chunks: AsyncIterator[bytes]) -> None:
    async for chunk in chunks:
        got.append(chunk)


async def eventually(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def test_no_head_within_response_header_times_out_and_closes_the_connection() -> None:
    async with server(silent) as (base, fates):
        client = Http1Upstream()
        limits = Timeouts(connect=10.0, response_header=LIMIT, idle=None)
        with pytest.raises(TimedOut, match=r"no answer within 0.2s .*timeouts.responseHeader"):
            await client.send("POST", base, "/", [(b"content-length", b"0")], None, limits)
        await asyncio.wait_for(eventually(lambda: fates == ["closed"]), 10)
        with pytest.raises(TimedOut):  # a new connection: the old one was never reused
            await client.send("POST", base, "/", [(b"content-length", b"0")], None, limits)
        await asyncio.wait_for(eventually(lambda: fates == ["closed", "closed"]), 10)
        await client.aclose()


async def test_a_body_that_pauses_past_idle_stalls_after_what_came_and_closes_the_connection() -> None:
    async with server(two_events_then_nothing) as (base, fates):
        client = Http1Upstream()
        reply = await client.send("GET", base, "/", [], None, Timeouts(10.0, None, LIMIT))
        got: list[bytes] = []
        with pytest.raises(Stalled, match=r"sent nothing for 0.2s, its timeouts.idle") as raised:
            await read_into(got, reply.chunks())
        assert isinstance(raised.value, BrokeOff)  # a break mid-body, as forwarding reports one
        assert b"".join(got) == EVENT * 2
        await reply.close()
        await asyncio.wait_for(eventually(lambda: fates == ["closed"]), 10)
        await client.aclose()


async def test_idle_counts_only_the_wait_on_the_server_not_a_slow_reader() -> None:
    async def whole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        frames = b"".join(b"%x\r\n%s\r\n" % (len(EVENT), EVENT) for _ in range(3))
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + frames + b"0\r\n\r\n")
        await writer.drain()

    async with server(whole) as (base, _):
        client = Http1Upstream()
        reply = await client.send("GET", base, "/", [], None, Timeouts(10.0, None, LIMIT))
        await asyncio.sleep(LIMIT * 2)  # the reader lags; the server has said everything
        got = b""
        async for chunk in reply.chunks():
            got += chunk
            await asyncio.sleep(LIMIT * 2)
        assert got == EVENT * 3
        await client.aclose()


async def test_idle_bounds_each_wait_not_the_whole_body() -> None:
    """A body that keeps coming, each chunk well within `idle`, for longer than `idle` in all."""
    idle, count = 0.5, 20

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(count):
            writer.write(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
            await writer.drain()
            await asyncio.sleep(idle / 10)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with server(trickle) as (base, _):
        client = Http1Upstream()
        reply = await client.send("GET", base, "/", [], None, Timeouts(10.0, None, idle))
        assert await reply.read() == EVENT * count
        await client.aclose()


async def test_without_limits_a_silent_server_is_waited_for() -> None:
    async with server(silent) as (base, _):
        client = Http1Upstream()
        sending = asyncio.create_task(
            client.send("POST", base, "/", [(b"content-length", b"0")], None, UNLIMITED)
        )
        done, _ = await asyncio.wait({sending}, timeout=LIMIT * 3)
        assert not done  # still waiting, as `responseHeader: 0` says
        sending.cancel()
        await asyncio.wait({sending})
        await client.aclose()


# -- the proxy, over the fake engine ----------------------------------------------------------


async def never_answers(request: httpx.Request, box: FakeContainer) -> httpx.Response:
    if request.url.path == "/health":
        return httpx.Response(200 if box.ready else 503)
    await asyncio.Event().wait()
    raise AssertionError("never")


async def stalls(request: httpx.Request, box: FakeContainer) -> httpx.Response:
    """Health; a stream of two events that then pauses for ever; a small JSON body that stops
    halfway through its length."""
    if request.url.path == "/health":
        return httpx.Response(200 if box.ready else 503)

    async def body(first: bytes) -> AsyncIterator[bytes]:
        yield first
        await asyncio.Event().wait()

    if json.loads(await request.aread()).get("stream"):
        events = {"content-type": "text/event-stream"}
        return httpx.Response(200, headers=events, stream=_Stream(body(EVENT * 2)))
    length = {"content-type": "application/json", "content-length": "100"}
    return httpx.Response(200, headers=length, stream=_Stream(body(b'{"choices": [')))


class _Stream(httpx.AsyncByteStream):
    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.chunks:
            yield chunk


def config(**timeouts: Any) -> dict[str, Any]:
    """Model `slow` with its own `timeouts`; every other limit from the global ones."""
    return {
        "instance": "test",
        "timeouts": {"connect": "5s", "responseHeader": LIMIT, "idle": LIMIT},
        "models": {"slow": {"image": "img", "timeouts": timeouts}},
    }


@contextlib.asynccontextmanager
async def stack(behaviour: FakeModel, **timeouts: Any) -> AsyncIterator[FakeStack]:
    found = FakeStack(config(**timeouts))
    found.backend.behaviour["slow"] = behaviour
    try:
        yield found
    finally:
        await found.close()


def chat(stream: bool) -> dict[str, Any]:
    return {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def stays_up(found: FakeStack) -> None:
    """The model is still ready, and no request holds it: a slow answer is not a crash."""
    (status,) = found.swapper.status()
    assert (status.state, status.in_flight) == ("ready", 0)
    assert found.backend.starts == {"slow": 1}


def error_events(body: str) -> list[dict[str, Any]]:
    lines = [line.removeprefix("data: ") for line in body.split("\n") if line.startswith("data: {")]
    return [event["error"] for event in map(json.loads, lines) if "error" in event]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_no_head_within_response_header_is_a_504_naming_the_model_and_the_limit(stream: bool) -> None:
    async with stack(FakeModel(handler=never_answers)) as found:
        await found.use("slow")  # ready: a stream gets its answer's head, or the error
        response = await found.client.post("/v1/chat/completions", json=chat(stream))
        assert response.status_code == 504
        error = response.json()["error"]
        assert error["code"] == "upstream_timeout"
        assert "model 'slow'" in error["message"]
        assert "0.2s of the request, its timeouts.responseHeader" in error["message"]
        stays_up(found)


async def test_a_stream_that_waits_for_its_model_gets_the_same_limit_in_an_error_event() -> None:
    async with stack(FakeModel(ready_after=LIMIT, handler=never_answers)) as found:
        response = await found.client.post("/v1/chat/completions", json=chat(True))
        assert response.status_code == 200  # the head went out before the wait
        (error,) = error_events(response.text)
        assert error["code"] == "upstream_timeout"
        assert "model 'slow'" in error["message"] and "timeouts.responseHeader" in error["message"]
        stays_up(found)


@pytest.mark.parametrize("loading", [False, True], ids=["ready", "while-loading"])
async def test_a_stream_paused_past_idle_ends_with_an_error_event_and_a_log_line(
    loading: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async with stack(FakeModel(ready_after=LIMIT if loading else 0, handler=stalls)) as found:
        if not loading:
            await found.use("slow")
        response = await found.client.post("/v1/chat/completions", json=chat(True))
        assert response.status_code == 200
        assert response.text.count('"content": "hi"') == 2  # what came before the pause
        (error,) = error_events(response.text)
        assert error["code"] == "upstream_timeout"
        assert "model 'slow'" in error["message"] and "timeouts.idle" in error["message"]
        assert any(r.message.startswith("slow: ") and "timeouts.idle" in r.message for r in caplog.records)
        stays_up(found)


async def test_a_small_answer_paused_past_idle_is_a_504() -> None:
    async with stack(FakeModel(handler=stalls)) as found:
        response = await found.client.post("/v1/chat/completions", json=chat(False))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert "timeouts.idle" in response.json()["error"]["message"]
        stays_up(found)


async def test_a_models_own_zero_lifts_the_global_limit() -> None:
    async with stack(FakeModel(handler=never_answers), responseHeader=0) as found:
        await found.use("slow")
        asking = asyncio.create_task(found.client.post("/v1/chat/completions", json=chat(False)))
        done, _ = await asyncio.wait({asking}, timeout=LIMIT * 3)
        assert not done  # no limit: still waiting for the head
        asking.cancel()
        await asyncio.wait({asking})
