"""A lean HTTP/1.1 client for the models' servers: asyncio connections, httptools' parser.

The forwarding path sends one request and relays one answer per call; a general client
(aiohttp, httpx) builds request and response objects, parses the URL, runs cookie, redirect
and trace machinery on every call, and that cost was a quarter of the proxy's CPU. Here a
server's address is parsed once, when its pool is made; a request is one write of bytes
built from headers already filtered; the answer's head is parsed in C (httptools, the parser
uvicorn uses) and its body handed on chunk by chunk, with the connection's reading paused
while the reader lags behind.

Connections are kept alive per server and reused last-in first-out; a connection the server
has closed leaves its pool when the close is seen. Errors, as the `Upstream` seam names
them: no connection is `Unreachable`, a connection closed before any answer is `Dropped`
(safe to send again), an answer that stops mid-body is `BrokeOff`.

Each request brings its model's `timeouts`: the connect, the wait from the request's write to
its answer's head (`TimedOut`), and each wait for the body's next chunk (`Stalled`), counted
only while the reader waits on the server, not while the server waits on a slow reader. A
connection that timed out is aborted: it never goes back to its pool.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

from swapctl.config import Timeouts
from swapctl.proxy.upstream import (
    Answer,
    BrokeOff,
    Dropped,
    RawHeaders,
    Unreachable,
    UpstreamError,
    no_head,
    stalled,
)

HIGH_WATER = 256 * 1024  # bytes buffered for a slow reader before the socket is paused


class _Reply:
    """One answer as it arrives on a connection: its head, then its body's chunks."""

    def __init__(self, connection: _Connection, head_only: bool, idle: float | None) -> None:
        self.connection = connection
        self.head_only = head_only  # a HEAD request: no body follows the head
        self.idle = idle  # seconds a wait for the next chunk may last; None: no limit
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head: asyncio.Future[None] = connection.loop.create_future()
        self.buffer: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.error: UpstreamError | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.waiting_since = 0.0  # when the reader began to wait for the next chunk
        self.timer: asyncio.TimerHandle | None = None  # armed at the first wait, moved only when it fires

    def wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def fail(self, error: UpstreamError) -> None:
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: a cancelled sender leaves it unread
        elif not self.complete:
            self.error = error
            self.wake()

    async def chunks(self) -> AsyncIterator[bytes]:
        loop = self.connection.loop
        try:
            while True:
                if self.buffer:
                    chunk = self.buffer.popleft()
                    self.buffered -= len(chunk)
                    if self.buffered < HIGH_WATER:
                        self.connection.resume()
                    yield chunk
                elif self.complete:
                    return
                elif self.error is not None:
                    raise self.error
                else:
                    self.waiter = loop.create_future()
                    if self.idle is not None:
                        self.waiting_since = loop.time()
                        if self.timer is None:
                            self.timer = loop.call_at(self.waiting_since + self.idle, self._check_idle)
                    await self.waiter
                    self.waiter = None
        finally:
            self._disarm()

    def _check_idle(self) -> None:
        """The idle timer, one per answer rather than one per wait (a wait per chunk): past
        its time, the answer stalled if its reader has waited `idle` since its wait began;
        else it waits on to the end of that wait's `idle`, or until the next wait if none."""
        assert self.idle is not None
        self.timer = None
        if self.waiter is None or self.waiter.done() or self.complete:
            return
        loop = self.connection.loop
        deadline = self.waiting_since + self.idle
        if loop.time() < deadline:
            self.timer = loop.call_at(deadline, self._check_idle)
            return
        self.error = stalled(self.idle)  # the answer ends here, its connection with it
        if self.connection.reply is self:
            self.connection.reply = None  # the abort's close must not end the answer as complete
        self.connection.abort()
        self.wake()

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        self._disarm()
        if not self.complete:  # left before its end: the connection cannot carry another
            self.connection.abort()


class _Connection(asyncio.Protocol):
    """One connection to a server, and httptools' callbacks for the answers on it."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.reply: _Reply | None = None
        self.answered = 0  # answers completed on it: a reused connection may be stale
        self.closed = False
        self.paused = False
        self.reusable = True

    # -- the caller's side --------------------------------------------------------------------

    def send(self, request: bytes, head_only: bool, idle: float | None) -> _Reply:
        assert self.transport is not None and self.reply is None
        self.reply = _Reply(self, head_only, idle)
        self.transport.write(request)
        return self.reply

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- asyncio's side -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.reply is None:  # bytes nobody asked for: the connection is out of step
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken("the server switched protocols, which swapctl does not relay")
        except httptools.HttpParserError as error:
            self._broken(f"malformed answer: {error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        reply, self.reply = self.reply, None
        if reply is None:
            return
        if reply.head.done() and not reply.complete and self._ends_at_close(reply):
            reply.complete = True  # an answer with neither length nor chunks ends at close
            reply.wake()
        elif not reply.head.done():
            reply.fail(Dropped(f"the connection closed before an answer ({exc!r})"))
        else:
            reply.fail(BrokeOff(f"the connection closed mid-answer ({exc!r})"))

    # -- httptools' callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.reply is not None
        self.reply.raw_headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        reply = self.reply
        assert reply is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            reply.raw_headers.clear()
            return
        reply.status = status
        if not self.parser.should_keep_alive():
            self.reusable = False
        reply.head.set_result(None)
        if reply.head_only:  # the parser would wait for a body that never comes
            self.reusable = False
            self._complete(reply)

    def on_body(self, body: bytes) -> None:
        reply = self.reply
        if reply is None or reply.complete:
            return
        reply.buffer.append(body)
        reply.buffered += len(body)
        if reply.buffered >= HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        reply.wake()

    def on_message_complete(self) -> None:
        reply = self.reply
        if reply is None or not reply.head.done() or reply.complete:
            return  # the end of an interim answer, or of a HEAD's already completed
        self._complete(reply)

    # -- helpers ------------------------------------------------------------------------------

    def _complete(self, reply: _Reply) -> None:
        reply.complete = True
        reply.wake()
        self.reply = None
        self.answered += 1
        if self.reusable and not self.closed:
            self.pool.put(self)
        else:
            self.abort()

    def _broken(self, message: str) -> None:
        reply = self.reply
        self.abort()
        if reply is not None:
            reply.fail(BrokeOff(message) if reply.head.done() else UpstreamError(message))

    @staticmethod
    def _ends_at_close(reply: _Reply) -> bool:
        names = {name for name, _ in reply.raw_headers}
        return b"content-length" not in names and b"transfer-encoding" not in names


class _Pool:
    """Kept-alive connections to one server, its address parsed once."""

    def __init__(self, base: str) -> None:
        parts = urlsplit(base)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not an http:// server address: {base!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.authority = parts.netloc.encode("latin-1")
        self.idle: list[_Connection] = []

    def put(self, connection: _Connection) -> None:
        self.idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    async def connection(self, timeout: float | None) -> _Connection:
        """A kept-alive connection, else a new one within `timeout` seconds (None: no limit)."""
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(lambda: _Connection(self), self.host, self.port)
        except TimeoutError:
            raise Unreachable(
                f"no connection to {self.host}:{self.port} within {timeout:g}s (its timeouts.connect)"
            ) from None
        except OSError as error:
            raise Unreachable(f"cannot connect to {self.host}:{self.port}: {error}") from error
        return protocol

    def close(self) -> None:
        for connection in self.idle:
            connection.abort()
        self.idle.clear()


class Answered:
    """An answer whose head has arrived (the `Answer` of the seam)."""

    __slots__ = ("_reply", "raw_headers", "status")

    def __init__(self, reply: _Reply) -> None:
        self._reply = reply
        self.status = reply.status
        self.raw_headers: RawHeaders = reply.raw_headers

    def chunks(self) -> AsyncIterator[bytes]:
        return self._reply.chunks()

    async def read(self) -> bytes:
        return await self._reply.read()

    async def close(self) -> None:
        await self._reply.close()


class Http1Upstream:
    """The hot path's `Upstream`: one pool of kept-alive connections per server address."""

    def __init__(self) -> None:
        self.pools: dict[str, _Pool] = {}

    async def send(
        self,
        method: str,
        base: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        timeouts: Timeouts,
    ) -> Answer:
        pool = self.pools.get(base)
        if pool is None:
            pool = self.pools[base] = _Pool(base)
        head = [f"{method} {target} HTTP/1.1\r\nhost: ".encode("latin-1"), pool.authority]
        for name, value in headers:
            head += (b"\r\n", name, b": ", value)
        head.append(b"\r\n\r\n")
        if body:
            head.append(body)
        connection = await pool.connection(timeouts.connect)
        reply = connection.send(b"".join(head), method == "HEAD", timeouts.idle)
        try:
            async with asyncio.timeout(timeouts.response_header):
                await reply.head
        except TimeoutError:
            connection.abort()  # the answer may still come: never on a connection reused
            raise no_head(timeouts.response_header or 0) from None
        except BaseException:
            connection.abort()  # cancelled, or failed: the connection is out of step
            raise
        return Answered(reply)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
