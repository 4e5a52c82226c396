"""An httpx transport over aiohttp's client.

The swapper and the proxy speak httpx (its transport seam is what the fake backend plugs
into); on the hot path httpcore's pool bookkeeping and socket layers cost about half of
the proxy's CPU, so the real transport hands requests to aiohttp's C-accelerated client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy

import aiohttp
import httpx


def no_cookies() -> CookieJar:
    """A jar that keeps nothing: one client serves every user, so no upstream cookie may stick.
    (A bare jar, not httpx.Cookies: the client copies those into a jar of its own.)"""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


class _Body(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.content.iter_any():
                yield chunk
        except aiohttp.ClientPayloadError as error:
            raise httpx.RemoteProtocolError(str(error)) from error
        except aiohttp.ClientError as error:
            raise httpx.ReadError(str(error)) from error

    async def aclose(self) -> None:
        self.response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.limit, enable_cleanup_closed=False)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        data: bytes | AsyncIterator[bytes]
        if isinstance(request.stream, httpx.ByteStream):
            data = request.content
        else:
            assert isinstance(request.stream, httpx.AsyncByteStream)
            data = request.stream.__aiter__()
        # aiohttp frames a streamed body itself (chunked unless a length is given)
        headers = [
            (k.decode(), v.decode()) for k, v in request.headers.raw if k.lower() != b"transfer-encoding"
        ]
        try:
            response = await self.session().request(
                request.method,
                str(request.url),
                headers=headers,
                data=data,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=timeout.get("connect"), sock_read=timeout.get("read")
                ),
            )
        except aiohttp.ClientConnectorError as error:
            raise httpx.ConnectError(str(error), request=request) from error
        except aiohttp.ServerDisconnectedError as error:
            raise httpx.RemoteProtocolError(str(error), request=request) from error
        except (aiohttp.ClientOSError, aiohttp.ClientPayloadError) as error:
            raise httpx.ReadError(str(error), request=request) from error
        except TimeoutError as error:
            raise httpx.TimeoutException(str(error), request=request) from error
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers]
        return httpx.Response(response.status, headers=headers, stream=_Body(response), request=request)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
