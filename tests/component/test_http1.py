"""The forwarding path's HTTP/1.1 client against scripted servers on 127.0.0.1: each server
answers with the bytes a test gives it, so every framing and failure is a real socket's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from support import free_port

from swapctl.config import Timeouts
from swapctl.proxy.http1 import HIGH_WATER, Http1Upstream
from swapctl.proxy.upstream import BrokeOff, Dropped, Unreachable

pytestmark = pytest.mark.anyio
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LIMITS = Timeouts(connect=10.0, response_header=None, idle=None)  # no limit but the connect


@pytest.fixture(params=[False, True], ids=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops: `swapctl up` runs on uvloop, whose transports differ from asyncio's."""
    return "asyncio", {"use_uvloop": request.param}


@contextlib.asynccontextmanager
async def server(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    """A server running `script` for each connection; yields its base URL and a list that
    counts the connections it accepted."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = listening.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        listening.close()


async def request_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def answer(body: bytes, *headers: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n" % len(body)
    return head + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head = await request_head(reader)
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        body = await reader.readexactly(length)
        writer.write(answer(b"got " + body, b"x-echo: " + head.split(b" ")[1]))
        await writer.drain()


async def test_a_request_goes_out_as_one_message_and_its_answer_comes_back() -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await request_head(reader) + await reader.readexactly(5))
        writer.write(answer(b"world", b"X-Thing: 1", b"Set-Cookie: a=1", b"Set-Cookie: b=2"))
        await writer.drain()

    async with server(script) as (base, _):
        client = Http1Upstream()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"5")]
        reply = await client.send("POST", base, "/v1/x?y=1", headers, b"hello", LIMITS)
        assert reply.status == 200
        assert await reply.read() == b"world"
        assert (b"x-thing", b"1") in reply.raw_headers  # names lower-cased
        assert [v for n, v in reply.raw_headers if n == b"set-cookie"] == [b"a=1", b"b=2"]
        await client.aclose()
    request = seen[0]
    assert request.startswith(b"POST /v1/x?y=1 HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"\r\ncontent-type: application/json\r\n" in request
    assert request.endswith(b"\r\n\r\nhello")


async def test_connections_are_kept_alive_and_reused() -> None:
    async with server(keep_answering) as (base, accepted):
        client = Http1Upstream()
        for n in range(5):
            reply = await client.send("POST", base, f"/{n}", [(b"content-length", b"1")], b"x", LIMITS)
            assert await reply.read() == b"got x"
            await reply.close()
        assert len(accepted) == 1
        await client.aclose()


async def test_concurrent_requests_each_get_their_own_connection_and_answer() -> None:
    async with server(keep_answering) as (base, accepted):
        client = Http1Upstream()

        async def one(n: int) -> bytes:
            reply = await client.send(
                "POST", base, f"/{n}", [(b"content-length", b"1")], str(n % 10).encode(), LIMITS
            )
            assert (b"x-echo", f"/{n}".encode()) in reply.raw_headers
            return await reply.read()

        got = await asyncio.gather(*(one(n) for n in range(20)))
        assert got == [f"got {n % 10}".encode() for n in range(20)]
        assert 1 < len(accepted) <= 20
        await client.aclose()


async def test_a_chunked_answer_comes_unchunked_and_in_pieces_as_it_arrives() -> None:
    go_on = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await go_on.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with server(script) as (base, _):
        client = Http1Upstream()
        reply = await client.send("GET", base, "/", [], None, LIMITS)
        chunks = reply.chunks()
        assert await anext(chunks) == b"first"  # before the rest is sent
        go_on.set()
        assert [c async for c in chunks] == [b"second"]
        await client.aclose()


async def test_an_answer_without_length_ends_when_the_server_closes() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()

    async with server(script) as (base, _):
        client = Http1Upstream()
        reply = await client.send("GET", base, "/", [], None, LIMITS)
        assert await reply.read() == b"all of it"
        await client.aclose()


async def test_a_head_request_ends_at_its_head() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with server(script) as (base, _):
        client = Http1Upstream()
        reply = await asyncio.wait_for(client.send("HEAD", base, "/", [], None, LIMITS), 10)
        assert (b"content-length", b"1000") in reply.raw_headers
        assert await asyncio.wait_for(reply.read(), 10) == b""
        await client.aclose()


async def test_an_interim_answer_is_skipped() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"final"))
        await writer.drain()
        await reader.read()

    async with server(script) as (base, _):
        client = Http1Upstream()
        reply = await client.send("POST", base, "/", [(b"expect", b"100-continue")], b"", LIMITS)
        assert (reply.status, await reply.read()) == (200, b"final")
        await client.aclose()


async def test_no_server_is_unreachable() -> None:
    client = Http1Upstream()
    with pytest.raises(Unreachable):
        await client.send("GET", f"http://127.0.0.1:{free_port()}", "/", [], None, LIMITS)
    await client.aclose()


async def test_a_kept_alive_connection_the_server_closed_is_dropped_and_the_next_send_connects_anew() -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(answer(b"one"))
        await writer.drain()
        # then it closes, without saying so in the answer (as llama-server does after streams)

    async with server(once) as (base, accepted):
        client = Http1Upstream()
        first = await client.send("GET", base, "/", [], None, LIMITS)
        assert await first.read() == b"one"
        with contextlib.suppress(Dropped):  # the close may or may not be seen before the reuse
            again = await client.send("GET", base, "/", [], None, LIMITS)
            assert await again.read() == b"one"
        third = await client.send("GET", base, "/", [], None, LIMITS)
        assert await third.read() == b"one"
        assert len(accepted) >= 2
        await client.aclose()


async def test_a_connection_closed_before_the_answer_is_dropped() -> None:
    async def rude(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)

    async with server(rude) as (base, _):
        client = Http1Upstream()
        with pytest.raises(Dropped):
            await client.send("GET", base, "/", [], None, LIMITS)
        await client.aclose()


async def test_an_answer_cut_mid_body_broke_off() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    async with server(cut) as (base, _):
        client = Http1Upstream()
        reply = await client.send("GET", base, "/", [], None, LIMITS)
        with pytest.raises(BrokeOff):
            await reply.read()
        await client.aclose()


async def test_a_malformed_answer_is_an_error_not_a_crash() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(b"this is not http\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with server(garbage) as (base, _):
        client = Http1Upstream()
        with pytest.raises(Exception, match="malformed answer"):
            await client.send("GET", base, "/", [], None, LIMITS)
        await client.aclose()


async def test_an_answer_closed_before_its_end_does_not_go_back_to_the_pool() -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await request_head(reader)
            writer.write(answer(bytes(64 * HIGH_WATER)))  # more than arrives before the close
            await writer.drain()

    async with server(big) as (base, accepted):
        client = Http1Upstream()
        reply = await client.send("GET", base, "/", [], None, LIMITS)
        await anext(reply.chunks())
        await reply.close()  # the rest unread: this connection cannot carry another request
        again = await client.send("GET", base, "/", [], None, LIMITS)
        assert len(await again.read()) == 64 * HIGH_WATER
        assert len(accepted) == 2
        await client.aclose()


async def test_a_slow_reader_pauses_the_socket_and_still_gets_every_byte() -> None:
    size = 64 * HIGH_WATER  # more than the sockets' buffers hold

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        writer.write(answer(bytes(size)))
        await writer.drain()
        await reader.read()

    async with server(flood) as (base, _):
        client = Http1Upstream()
        reply = await client.send("GET", base, "/", [], None, LIMITS)
        await asyncio.sleep(0.2)  # the server has written all it can; the client reads nothing
        pending = reply._reply  # type: ignore[attr-defined]
        assert pending.connection.paused
        assert pending.buffered < size // 4  # held back in the sockets, not in memory
        got = 0
        async for chunk in reply.chunks():
            got += len(chunk)
        assert got == size
        await client.aclose()


async def test_a_cancelled_request_leaves_no_connection_in_the_pool() -> None:
    hold = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await request_head(reader)
        await hold.wait()

    async with server(silent) as (base, _):
        client = Http1Upstream()
        sending = asyncio.create_task(client.send("GET", base, "/", [], None, LIMITS))
        await asyncio.sleep(0.1)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert client.pools[base].idle == []
        hold.set()
        await client.aclose()
