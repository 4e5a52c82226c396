"""WebSockets to a model's server, through `/upstream/<model>/<path>` and `?model=` on any
other path (a ComfyUI-style web UI, a realtime endpoint).

The model is found (aliases too), admitted and started as for an HTTP request; then its
server's WebSocket is opened at the same path and query, with the client's subprotocols and
end-to-end headers (never the hop-by-hop ones, nor a key of swapctl's: the guard took it),
and only then the client's is accepted, with the subprotocol the server chose. Messages,
text and binary, are relayed both ways until one side closes; its close code and reason go
to the other. The lease is held while the socket is open: the model counts in flight, so an
eviction waits for the socket to close (as for any request in flight), and no ttl or sleep
ends it meanwhile. The `websockets` library speaks to the server; Starlette to the client.

How each way out ends, for the client:

| what happens                                   | the client gets                                  |
|------------------------------------------------|--------------------------------------------------|
| an unknown model, no `?model=`, a busy model,  | the handshake denied with the HTTP status and    |
| a failed start, engine trouble                 | error JSON an HTTP request gets (`guard.deny`)   |
| it leaves while its model starts               | nothing: the wait ends, the hold is released     |
| the server refuses the handshake or cannot be  | accepted, then closed 1014 (bad gateway), the    |
| reached                                        | reason naming the model                          |
| the server closes                              | its code and reason (none given: 1000)           |
| the server's connection breaks off             | 1011, the reason naming the model                |

and for the server: the client's code and reason when it closes (1001 when it vanished).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from urllib.parse import quote

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import EXTERNAL_CLOSE_CODES, CloseCode

from swapctl.errors import RequestError
from swapctl.lifecycle import Lease, Ticket
from swapctl.proxy.errors import ClientGone, error_response
from swapctl.proxy.forwarding import (
    _PATH_SAFE,
    Forwarder,
    Hold,
    elsewhere_headers,
    end_to_end,
    peer_target,
    upstream_headers,
)
from swapctl.proxy.guard import deny
from swapctl.remote import There
from swapctl.remote.places import Sent

log = logging.getLogger("swapctl")

OPEN_TIMEOUT = 10.0  # seconds for the server's handshake: its model is ready by then
MAX_MESSAGE = 2**24  # bytes of a message from the server; uvicorn's bound on the client's
REASON_BYTES = 123  # the most a close frame's reason may hold
# the handshake's own headers: the library writes the server's, the client's are not its
_HANDSHAKE = (b"sec-websocket-",)
# not passed back from the server's handshake answer: the handshake's, the guard's, uvicorn's
_NOT_BACK = (*_HANDSHAKE, b"access-control-")
_UVICORNS = frozenset({b"date", b"server", b"content-length"})


@dataclass(frozen=True, slots=True)
class Closed:
    """A side's close: its code and reason."""

    code: int
    reason: str


def reason(text: str) -> str:
    """`text` cut to what a close frame can carry (123 bytes of UTF-8), at a character."""
    return text.encode()[:REASON_BYTES].decode(errors="ignore")


def sendable(code: int | None, missing: int, other: int) -> int:
    """A close code that may be sent on: `missing` for none given (1005), `other` for one
    only an endpoint may see (1006 and the like), the code itself otherwise."""
    if code in EXTERNAL_CLOSE_CODES or (code is not None and 3000 <= code <= 4999):
        return code
    return missing if code in (None, CloseCode.NO_STATUS_RCVD) else other


def server_url(base: str, path: str, query: bytes) -> str:
    """The server's WebSocket URL for `path` (unquoted) and the raw query."""
    return "ws" + base.removeprefix("http") + _quoted(path, query)


def _quoted(path: str, query: bytes) -> str:
    return quote(path, safe=_PATH_SAFE) + (f"?{query.decode('latin-1')}" if query else "")


def server_headers(websocket: WebSocket) -> list[tuple[str, str]]:
    """The client's end-to-end headers for the server, but the handshake's own, with its
    address in X-Forwarded-For, as an HTTP request sends them."""
    headers = upstream_headers(websocket.scope, None)
    return [(n.decode(), v.decode("latin-1")) for n, v in headers if not n.startswith(_HANDSHAKE)]


class Sockets:
    """The WebSocket routes, beside the forwarder's HTTP ones; its model and metrics are theirs."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    def routes(self) -> list[WebSocketRoute]:
        return [
            WebSocketRoute("/upstream/{rest:path}", self.upstream),
            WebSocketRoute("/{path:path}", self.by_query),
        ]

    async def upstream(self, websocket: WebSocket) -> None:
        """`/upstream/<model>/<path>`."""
        rest = websocket.path_params["rest"]
        name = self.forwarder.upstream_name(rest)
        path = rest[len(name) :] if name is not None else ""
        await self.relay(websocket, name or rest.split("/")[0], path or "/")

    async def by_query(self, websocket: WebSocket) -> None:
        """Any other path, with `?model=`."""
        name = websocket.query_params.get("model")
        if not name:
            message = (
                f"no WebSocket route {websocket.url.path}: name a model (?model=, or /upstream/<model>/)"
            )
            await self._deny(websocket, RequestError(404, message, "not_found"), time.perf_counter(), None)
            return
        await self.relay(websocket, name, websocket.url.path)

    async def relay(self, websocket: WebSocket, name: str, path: str) -> None:
        """The whole life of one socket; the lease it holds is released on every way out."""
        began = time.perf_counter()
        await websocket.receive()  # the handshake's start: what comes next can only be its end
        places, requests = self.forwarder.places, self.forwarder.requests
        try:
            model = places.resolve(name)
        except Exception as error:
            await self._deny(websocket, error, began, None, name)
            return
        requests.begin(model, websocket.scope, b"")  # on record as its handshake, until it is open
        try:
            where = await places.choose(model, websocket.scope)
            if isinstance(where, There):
                requests.went(where.place.label)
                lease: Hold = Sent(where, places)
            else:
                swapper = places.swapper_of(where)
                ticket = await swapper.admit(model)
                requests.went(where.host, None if ticket.ready else swapper.activity.swaps)
                lease = await self._lease(websocket, ticket)
        except ClientGone as gone:
            log.info("WebSocket %s: the client went away (%s)", websocket.url.path, gone.model)
            self.forwarder.record(str(gone.model), 499, began)
            return
        except Exception as error:
            await self._deny(websocket, error, began, model)
            return
        try:
            headers = server_headers(websocket)
            query = websocket.scope["query_string"]
            if isinstance(where, There):  # a peer's or a proxy: model's: its key, the nodes passed
                raw = [(n.encode(), v.encode("latin-1")) for n, v in headers]
                headers = [(n.decode(), v.decode("latin-1")) for n, v in elsewhere_headers(where, raw)]
                target = peer_target(where, websocket.url.path, _quoted(path, query))
                url = server_url(where.place.url, "", b"") + target
            else:
                url = server_url(lease.url if isinstance(lease, Lease) else "", path, query)
            await self._open(websocket, lease, url, headers, began)
        finally:
            await lease.release()

    async def _deny(
        self, websocket: WebSocket, error: Exception, began: float, model: str | None, name: str | None = None
    ) -> None:
        """The handshake denied with the answer an HTTP request would get. Its entry on record
        ends: `model`'s, once resolved (this machine's models counted in the metrics too); else
        a refusal of `name`, what the client asked for."""
        answer = error_response(error)
        if model is None:
            self.forwarder.requests.refused(websocket.scope, name, answer.status_code, str(error), began)
        elif model in self.forwarder.config.models:
            self.forwarder.record(model, answer.status_code, began)
        else:
            self.forwarder.requests.end(model, answer.status_code)
        await deny(websocket.scope, websocket.receive, websocket.send, answer)

    async def _lease(self, websocket: WebSocket, ticket: Ticket) -> Lease:
        """The lease once the model is ready; ClientGone, the hold released, if the client
        leaves first (before its socket is accepted, the client can only leave)."""
        if ticket.ready:
            return await ticket.lease()
        waiting = asyncio.create_task(ticket.lease())
        watcher = asyncio.create_task(websocket.receive())
        try:
            await asyncio.wait((waiting, watcher), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: the server is shutting down
            await _drop(waiting, ticket)
            raise
        finally:
            watcher.cancel()
        if waiting.done():
            return waiting.result()  # or the start's error
        await _drop(waiting, ticket)
        raise ClientGone(ticket.model)

    async def _open(
        self, websocket: WebSocket, lease: Hold, url: str, offer: list[tuple[str, str]], began: float
    ) -> None:
        """The server's socket, then the client's accepted with its subprotocol and relayed."""
        model, scope = lease.model, websocket.scope
        try:
            server = await connect(
                url,
                subprotocols=scope.get("subprotocols") or None,
                additional_headers=offer,
                user_agent_header=None,  # the client's own goes on, if it sent one
                proxy=None,  # the model's server is on this machine: never through a proxy
                compression=None,  # loopback: not worth the CPU; the client's is uvicorn's
                open_timeout=OPEN_TIMEOUT,
                max_size=MAX_MESSAGE,
            )
        except InvalidStatus as error:
            why = f"its server refused the WebSocket (HTTP {error.response.status_code})"
            await self._refused(websocket, model, why, began)
            return
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as error:
            await self.forwarder.broke(lease, error)
            await self._refused(websocket, model, f"its server did not open the WebSocket: {error}", began)
            return
        async with server:
            found = server.response.headers.raw_items() if server.response is not None else ()
            answered = [(n.lower().encode(), v.encode("latin-1")) for n, v in found]
            headers = [
                (n, v) for n, v in end_to_end(answered) if not n.startswith(_NOT_BACK) and n not in _UVICORNS
            ]
            await websocket.accept(subprotocol=server.subprotocol, headers=headers)
            self.forwarder.record(model, 101, began)  # its time: until the socket was open
            await self._pump(websocket, server, model)

    async def _refused(self, websocket: WebSocket, model: str, why: str, began: float) -> None:
        """A server that would not open the socket: the client's is accepted, then closed
        1014 with the reason, which a browser's script can read (a denial it cannot)."""
        log.warning("%s: %s", model, why)
        self.forwarder.record(model, 502, began)
        await websocket.accept()
        await websocket.close(CloseCode.BAD_GATEWAY, reason(f"model '{model}': {why}"))

    async def _pump(self, websocket: WebSocket, server: ClientConnection, model: str) -> None:
        """Both ways at once until one side ends, then the other side told how it ended (the
        caller's `async with` closes the server's socket whatever happens)."""
        outward = asyncio.create_task(_to_server(websocket, server))
        inward = asyncio.create_task(_to_client(server, websocket))
        try:
            await asyncio.wait((outward, inward), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            outward.cancel()
            inward.cancel()
            raise
        if outward.done() and (left := outward.result()) is not None:  # the client closed or vanished
            inward.cancel()
            code = sendable(left.code, CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY)
            await server.close(code, reason(left.reason))
            return
        outward.cancel()  # the server's socket closed: what it still sends goes to the client
        if not await inward:  # the client vanished as a message went to it
            await server.close(CloseCode.GOING_AWAY)
            return
        said = server.close_reason or ""
        if server.close_code == CloseCode.ABNORMAL_CLOSURE:
            log.warning("%s: its server's WebSocket broke off", model)
            said = f"model '{model}': its server's WebSocket broke off"
        out = sendable(server.close_code, CloseCode.NORMAL_CLOSURE, CloseCode.INTERNAL_ERROR)
        with contextlib.suppress(WebSocketDisconnect, OSError):  # the client may be gone already
            await websocket.close(out, reason(said))


async def _to_server(websocket: WebSocket, server: ClientConnection) -> Closed | None:
    """The client's messages to the server until the client closes (its close) or the server's
    socket does (None)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return Closed(message.get("code", CloseCode.NORMAL_CLOSURE), message.get("reason") or "")
        text = message.get("text")
        try:
            await server.send(text if text is not None else message.get("bytes") or b"")
        except ConnectionClosed:
            return None


async def _to_client(server: ClientConnection, websocket: WebSocket) -> bool:
    """The server's messages to the client until the server's socket closes (True) or the
    client is found gone (False)."""
    try:
        async for message in server:
            if isinstance(message, str):
                await websocket.send_text(message)
            else:
                await websocket.send_bytes(message)
    except ConnectionClosed:
        pass  # it broke off: its close code says so
    except (WebSocketDisconnect, OSError):
        return False
    return True


async def _drop(waiting: asyncio.Task[Lease], ticket: Ticket) -> None:
    """Give up a wait for a lease: the lease, if it came anyway, and the ticket released."""
    waiting.cancel()
    await asyncio.wait((waiting,))
    if not waiting.cancelled() and waiting.exception() is None:
        await waiting.result().release()
    await ticket.release()  # nothing once it was turned into a lease
