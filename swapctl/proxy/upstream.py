"""The models' servers as forwarding sees them: send one request, get its status, raw
headers and body chunks, each wait bounded by the model's `timeouts`. Their errors are
translated once, here, into these kinds.

`http1.Http1Upstream` is the hot path: kept-alive connections and httptools' parser, no
general client's machinery. `HttpxUpstream` takes any httpx client, so the fake backend's
in-memory transport serves the component tests through the same code.

    UpstreamError
     +-- Unreachable   no connection: the server is not (or no longer) listening
     +-- Dropped       a kept-alive connection closed before any answer: safe to send again
     +-- BrokeOff      the answer stopped mid-body
     |    +-- Stalled  nothing came for `timeouts.idle` (a TimedOut too)
     +-- TimedOut      no answer's head within `timeouts.responseHeader`

A timeout is a slow server, not a dead one: its connection is closed, never reused, and
nothing says the model crashed.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import httpx

from swapctl.config import Timeouts

RawHeaders = Sequence[tuple[bytes, bytes]]
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')
_PREDICTED = re.compile(rb'"predicted_n"\s*:\s*(\d{1,12})')


class UpstreamError(Exception):
    pass


class Unreachable(UpstreamError):
    pass


class Dropped(UpstreamError):
    pass


class BrokeOff(UpstreamError):
    pass


class TimedOut(UpstreamError):
    pass


class Stalled(BrokeOff, TimedOut):
    pass


def no_head(seconds: float) -> TimedOut:
    return TimedOut(f"no answer within {seconds:g}s of the request, its timeouts.responseHeader")


def stalled(seconds: float) -> Stalled:
    return Stalled(f"sent nothing for {seconds:g}s, its timeouts.idle")


class Answer(Protocol):
    status: int
    raw_headers: RawHeaders  # as received, names lower-cased, repeats kept

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, untouched (a Content-Encoding is passed on as is); Stalled
        when the next chunk takes longer than the `timeouts.idle` it was sent with."""
        ...

    async def read(self) -> bytes: ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    async def send(
        self,
        method: str,
        base: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        timeouts: Timeouts,
    ) -> Answer:
        """Send a request to the server at `base` (`http://host:port`) for `target` (path and
        query); the answer once its head has arrived. `timeouts` bound the connection
        (Unreachable), the wait for the head (TimedOut), and each wait of the answer's chunks."""
        ...


class _HttpxAnswer:
    def __init__(self, response: httpx.Response, idle: float | None) -> None:
        self.response, self.idle = response, idle
        self.status = response.status_code
        self.raw_headers: RawHeaders = [(name.lower(), value) for name, value in response.headers.raw]

    async def chunks(self) -> AsyncIterator[bytes]:
        body = self.response.aiter_raw()
        while True:
            try:
                async with asyncio.timeout(self.idle):
                    chunk = await anext(body)
            except StopAsyncIteration:
                return
            except TimeoutError:
                await self.response.aclose()  # half read: its connection is not reused
                raise stalled(self.idle or 0) from None
            except httpx.TransportError as error:
                raise BrokeOff(repr(error)) from error
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        await self.response.aclose()


class HttpxUpstream:
    """Over an httpx client: the fake backend's transport, or any other (its owner closes it)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(
        self,
        method: str,
        base: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        timeouts: Timeouts,
    ) -> Answer:
        # the connect bounded by httpx; the rest here, as the client's own read timeout
        # would bound each read, the wait for the head and the chunks alike
        limits = httpx.Timeout(None, connect=timeouts.connect)
        request = self.client.build_request(
            method, base + target, headers=headers, content=body, timeout=limits
        )
        try:
            async with asyncio.timeout(timeouts.response_header):
                response = await self.client.send(request, stream=True)
        except TimeoutError:
            raise no_head(timeouts.response_header or 0) from None
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            raise Unreachable(repr(error)) from error
        except (httpx.RemoteProtocolError, httpx.ReadError) as error:
            raise Dropped(repr(error)) from error
        except httpx.TransportError as error:
            raise UpstreamError(repr(error)) from error
        return _HttpxAnswer(response, timeouts.idle)


class ByScheme:
    """`http` (the hot path's client) for a server at a plain http://host:port, `general`
    for any other (https://, or a URL with a path prefix): peers and `proxy:` models may be
    either."""

    def __init__(self, http: Upstream, general: Upstream) -> None:
        self.http, self.general = http, general

    async def send(
        self,
        method: str,
        base: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        timeouts: Timeouts,
    ) -> Answer:
        plain = base.startswith("http://") and base.count("/") == 2  # no path below the root
        upstream = self.http if plain else self.general
        return await upstream.send(method, base, target, headers, body, timeouts)


def tokens_in(answer: bytes) -> int | None:
    """The tokens an answer (or a stream's event) says it generated: OpenAI's
    `usage.completion_tokens`, else llama.cpp's `timings.predicted_n`; None if it says not."""
    found = _COMPLETION_TOKENS.search(answer) or _PREDICTED.search(answer)
    return int(found[1]) if found else None


@dataclass(slots=True)
class Tally:
    """What a stream reported as it passed: the tokens generated, once its usage came by; when
    its first chunk came, the chunk that reported them; each chunk to `keep` (a capture)."""

    tokens: int | None = None
    first: float | None = None  # perf_counter
    usage: bytes | None = None
    keep: Callable[[bytes], None] | None = None

    def seen(self, chunk: bytes) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        if b'_tokens"' in chunk or b'"predicted_n"' in chunk:
            self.tokens = tokens_in(chunk) or self.tokens
            self.usage = chunk
        if self.keep is not None:
            self.keep(chunk)
