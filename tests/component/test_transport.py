"""The aiohttp-backed httpx transport, against a real local server on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from swapctl.proxy.transport import AiohttpTransport, no_cookies

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if request.path == "/stream":
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(f"data: {i}\n\n".encode())
        await response.write_eof()
        return response
    response = web.json_response(
        {
            "method": request.method,
            "bytes": len(body),
            "chunked": "chunked" in request.headers.get("transfer-encoding", ""),
        }
    )
    response.set_cookie("session", "secret")
    return response


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=AiohttpTransport(), cookies=no_cookies()) as client:
        yield client


async def test_bodies_of_every_kind(server: str, client: httpx.AsyncClient) -> None:
    assert (await client.get(server + "/x")).json() == {"method": "GET", "bytes": 0, "chunked": False}
    assert (await client.post(server + "/x", content=b"abc")).json()["bytes"] == 3

    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    sent = (await client.put(server + "/x", content=parts())).json()
    assert sent == {"method": "PUT", "bytes": 4, "chunked": True}


async def test_streams_arrive_in_pieces(server: str, client: httpx.AsyncClient) -> None:
    async with client.stream("GET", server + "/stream") as response:
        received = b"".join([chunk async for chunk in response.aiter_raw()])
    assert received == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_no_cookie_sticks_between_users(server: str, client: httpx.AsyncClient) -> None:
    response = await client.get(server + "/x")
    assert "session=secret" in response.headers["set-cookie"]  # passed on to the client...
    assert not client.cookies  # ...and kept by nobody


async def test_a_closed_port_is_a_connect_error(client: httpx.AsyncClient) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(httpx.ConnectError):
        await client.get(f"http://127.0.0.1:{port}/")


async def test_nothing_is_added_to_what_is_forwarded() -> None:
    seen: dict[str, str] = {}

    async def headers(request: web.Request) -> web.Response:
        seen.update(request.headers)
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/h", headers)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with httpx.AsyncClient(transport=AiohttpTransport()) as client:
            await client.get(f"http://127.0.0.1:{port}/h", headers={"x-asked": "1"})
    finally:
        await runner.cleanup()
    assert "Content-Type" not in seen
    assert seen["x-asked"] == "1"
