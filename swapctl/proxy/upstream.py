"""The models' servers as forwarding sees them: send one request, get its status, raw
headers and body chunks. Their errors are translated once, here, into three kinds.

`AiohttpUpstream` is the hot path: aiohttp's C-accelerated client, called directly (an
httpx layer over it cost about a sixth of the proxy's CPU: URL parsing, request and
response objects, a cookie pass per answer). `HttpxUpstream` takes any httpx client, so
the fake backend's in-memory transport serves the component tests through the same code.

    UpstreamError
     +-- Unreachable   no connection: the server is not (or no longer) listening
     +-- Dropped       a kept-alive connection closed before any answer: safe to send again
     +-- BrokeOff      the answer stopped mid-body
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import aiohttp
import httpx

RawHeaders = Sequence[tuple[bytes, bytes]]


class UpstreamError(Exception):
    pass


class Unreachable(UpstreamError):
    pass


class Dropped(UpstreamError):
    pass


class BrokeOff(UpstreamError):
    pass


class Answer(Protocol):
    status: int
    raw_headers: RawHeaders  # as received, names lower-cased, repeats kept

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, untouched (a Content-Encoding is passed on as is)."""
        ...

    async def read(self) -> bytes: ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    async def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None) -> Answer:
        """Send a request; the answer once its head has arrived."""
        ...


class _AiohttpAnswer:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status
        self.raw_headers: RawHeaders = [(name.lower(), value) for name, value in response.raw_headers]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except aiohttp.ClientError as error:
            raise BrokeOff(repr(error)) from error

    async def read(self) -> bytes:
        try:
            return await self.response.read()
        except aiohttp.ClientError as error:
            raise BrokeOff(repr(error)) from error

    async def close(self) -> None:
        self.response.release()


class AiohttpUpstream:
    """One session for every model: keep-alive connections, no cookie jar (one client serves
    every user, so no upstream cookie may stick), no header of its own added."""

    def __init__(self, connect_timeout: float = 10.0, limit: int = 1000) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        self.limit = limit
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made in the running loop, on first use
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.limit, enable_cleanup_closed=False),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                timeout=self.timeout,
            )
        return self._session

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None) -> Answer:
        try:
            response = await self.session().request(
                method, url, headers=headers, data=body, allow_redirects=False
            )
        except aiohttp.ClientConnectorError as error:
            raise Unreachable(repr(error)) from error
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            raise Dropped(repr(error)) from error
        except (aiohttp.ClientError, TimeoutError) as error:
            raise UpstreamError(repr(error)) from error
        return _AiohttpAnswer(response)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _HttpxAnswer:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code
        self.raw_headers: RawHeaders = [(name.lower(), value) for name, value in response.headers.raw]

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.aiter_raw():
                yield chunk
        except httpx.TransportError as error:
            raise BrokeOff(repr(error)) from error

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        await self.response.aclose()


class HttpxUpstream:
    """Over an httpx client: the fake backend's transport, or any other (its owner closes it)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes | None) -> Answer:
        request = self.client.build_request(method, url, headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.ConnectError as error:
            raise Unreachable(repr(error)) from error
        except (httpx.RemoteProtocolError, httpx.ReadError) as error:
            raise Dropped(repr(error)) from error
        except httpx.TransportError as error:
            raise UpstreamError(repr(error)) from error
        return _HttpxAnswer(response)
