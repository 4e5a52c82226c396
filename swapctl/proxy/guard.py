"""Who may talk to the proxy: one ASGI middleware in front of every route.

A proxy on 127.0.0.1 is still reachable from every web page the user opens: a page can send
requests to it (a form POST needs no CORS permission), and a name the attacker controls can
be rebound to 127.0.0.1 (DNS rebinding) so that the page may even read the answers. So, for
each HTTP request, in this order:

1. Host: a name must be the listen host, a loopback name or one of `allowedHosts`, else 421.
   An IP literal always passes: a rebinding attack needs a name the attacker controls.
2. Origin: a request from a browser page of another origin (its `Origin`, or, without one,
   `Sec-Fetch-Site: cross-site|same-site`) is refused with 403 unless `cors` allows that
   origin, so a page cannot blindly start, stop or use models either. A link from another
   site to `GET /ui` or `/health` is followed: they hold no data and change nothing, and
   the page cannot be framed (its `frame-ancestors 'none'`).
3. A CORS preflight from an allowed origin is answered here (204), never forwarded.
4. With `apiKeys`, every route but `GET /health` and `GET /ui` needs a key (401 otherwise);
   the headers that carried one are not passed on upstream. The page at /ui holds no data:
   a browser opening it sends no key, and the page sends one with each call it makes.

`Access-Control-*` headers of upstream answers are always dropped: only this module decides
what a browser may read.

A WebSocket's handshake passes the same checks, refused by `deny` (an HTTP denial where the
server can send one, uvicorn can; else a close, which servers answer with 403). CORS does not
cover WebSockets: a browser opens one to any site and sends its page's `Origin`, so a handshake
whose `Origin` is neither this host nor in `cors` is refused. A browser cannot set headers on
a WebSocket either, so besides `Authorization` and `x-api-key` a key may come as the
subprotocol `swapctl.key.<the key in unpadded base64url>` (as Kubernetes does for bearer
tokens): never in the URL, where logs and histories keep it. That subprotocol is taken out
of the offer the model's server sees; when the server picks none, it is the one answered, as
a browser that offered subprotocols needs one back.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from collections.abc import Iterable

from pydantic import SecretStr
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from swapctl.config.scalars import host_of
from swapctl.proxy.errors import error_body, error_json

ALLOW_METHODS = b"GET, POST, PUT, PATCH, DELETE, OPTIONS, HEAD"
ALLOW_HEADERS = b"authorization, content-type, x-api-key"
MAX_AGE = b"600"
_WANTED = {
    b"host",
    b"origin",
    b"authorization",
    b"x-api-key",
    b"sec-fetch-site",
    b"access-control-request-method",
    b"access-control-request-headers",
}
_TOKENS = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:[ \t]*,[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+)*")
_ACCESS_CONTROL = b"access-control-"
OPEN_PATHS = frozenset({"/health", "/ui"})  # GET without a key: they hold no data
KEY_PROTOCOL = "swapctl.key."  # a WebSocket subprotocol carrying a key, base64url after it
DENIAL = "websocket.http.response"  # the ASGI extension for an HTTP answer to a handshake


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> ASGIApp:
    """A refusal, in the error shape of the route it answers (Anthropic's on its routes)."""
    body = error_body(message, "invalid_request_error", code)

    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await error_json(scope["path"], status, body, headers)(scope, receive, send)

    return answer


async def deny(scope: Scope, receive: Receive, send: Send, answer: ASGIApp) -> None:
    """Refuse a WebSocket's handshake with `answer`, an HTTP response, where the server can send
    one; else close it before it is accepted (the server answers 403)."""
    if DENIAL in scope.get("extensions", {}):
        await answer(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": ""})


def _key_in(protocol: str) -> bytes:
    """The key a `swapctl.key.` subprotocol carries; empty if it is not base64url."""
    encoded = protocol.removeprefix(KEY_PROTOCOL)
    try:
        return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return b""


class Guard:
    """The checks above, for HTTP requests and WebSockets; lifespan passes through."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        listen_host: str,
        allowed_hosts: Iterable[str] = (),
        cors: Iterable[str] = (),
        api_keys: Iterable[SecretStr] = (),
    ) -> None:
        self.app = app
        allowed = [host_of(h) for h in allowed_hosts]
        self.any_host = "*" in allowed
        self.hosts = {host_of(listen_host), *(h for h in allowed if not h.startswith("*."))}
        # "*.example.com": any name under example.com; names under localhost are this machine's
        self.suffixes = (".localhost", *(h[1:] for h in allowed if h.startswith("*.")))
        self.origins = {origin.lower().encode("latin-1") for origin in cors}
        self.any_origin = b"*" in self.origins
        # bytes, compared as they come off the wire; never printed (no repr holds them)
        self._keys = tuple(key.get_secret_value().encode() for key in api_keys)

    def host_allowed(self, host: str) -> bool:
        return (
            self.any_host
            or host in self.hosts
            or host == "localhost"
            or host.endswith(self.suffixes)
            or _is_ip(host)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        got = {name: value for name, value in scope["headers"] if name in _WANTED}
        host = got.get(b"host", b"").lower()
        origin = got.get(b"origin")
        cors = origin is not None and (self.any_origin or origin.lower() in self.origins)
        reply = self._reply(send, origin if cors else None)
        opened = scope["path"] in OPEN_PATHS and scope["method"] in ("GET", "HEAD")
        refusal = self._refusal(host, origin, cors, None if opened else got.get(b"sec-fetch-site"))
        if refusal is not None:
            await refusal(scope, receive, reply)
            return
        if scope["method"] == "OPTIONS" and origin is not None and b"access-control-request-method" in got:
            requested = got.get(b"access-control-request-headers")
            await self._preflight(origin, cors, requested)(scope, receive, send)
            return
        if self._keys and not opened:
            carried = self._carrying_a_key(got)
            if not carried:
                given = b"authorization" in got or b"x-api-key" in got
                message = (
                    "invalid API key"
                    if given
                    else "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
                )
                response = _error(401, message, "invalid_api_key", {"www-authenticate": "Bearer"})
                await response(scope, receive, reply)
                return
            # a swapctl key is swapctl's: it never reaches a model's server
            headers = [(name, value) for name, value in scope["headers"] if name not in carried]
            scope = {**scope, "headers": headers}
        await self.app(scope, receive, reply)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket's handshake: Host, Origin (same host or `cors`), then a key (a header or
        the key subprotocol), which is taken out before the app sees the handshake."""
        got = {name: value for name, value in scope["headers"] if name in _WANTED}
        origin = got.get(b"origin")
        cors = origin is not None and (self.any_origin or origin.lower() in self.origins)
        refusal = self._refusal(got.get(b"host", b"").lower(), origin, cors, got.get(b"sec-fetch-site"))
        offered: list[str] = list(scope.get("subprotocols", ()))
        keyed = [p for p in offered if p.startswith(KEY_PROTOCOL)]
        carried = self._carrying_a_key(got)
        if refusal is None and self._keys and not carried and not any(self._valid(_key_in(p)) for p in keyed):
            given = bool(keyed) or b"authorization" in got or b"x-api-key" in got
            message = (
                "invalid API key"
                if given
                else "missing API key: send 'Authorization: Bearer <key>', 'x-api-key: <key>' or"
                f" the subprotocol '{KEY_PROTOCOL}<the key in base64url>'"
            )
            refusal = _error(401, message, "invalid_api_key", {"www-authenticate": "Bearer"})
        if refusal is not None:
            await deny(scope, receive, send, refusal)
            return
        # a swapctl key is swapctl's: it never reaches a model's server
        rest = [p for p in offered if not p.startswith(KEY_PROTOCOL)]
        headers = [(n, v) for n, v in scope["headers"] if n not in carried and n != b"sec-websocket-protocol"]
        if rest:
            headers.append((b"sec-websocket-protocol", ", ".join(rest).encode("latin-1")))
        scope = {**scope, "headers": headers, "subprotocols": rest}
        await self.app(scope, receive, self._accepting(send, keyed[0] if keyed else None))

    @staticmethod
    def _accepting(send: Send, key_protocol: str | None) -> Send:
        """`send`, answering a WebSocket with the key subprotocol when the app picks none: a
        browser that offered subprotocols fails a handshake that answers none."""
        if key_protocol is None:
            return send

        async def accepting(message: Message) -> None:
            if message["type"] == "websocket.accept" and not message.get("subprotocol"):
                message = {**message, "subprotocol": key_protocol}
            await send(message)

        return accepting

    def _refusal(
        self, host: bytes, origin: bytes | None, cors: bool, fetch_site: bytes | None
    ) -> ASGIApp | None:
        """421 for a Host this server does not answer to; 403 for another site's page."""
        name = host_of(host.decode("latin-1"))
        if host and not self.host_allowed(name):
            message = (
                f"this server does not answer to the host '{name}' (a guard against DNS rebinding);"
                " add it to allowedHosts to use that name"
            )
            return _error(421, message, "host_not_allowed")
        if origin is not None:
            # same origin: a page this server itself served (a model's web UI under /upstream/)
            if cors or origin.lower().partition(b"://")[2] == host:
                return None
            shown = origin.decode("latin-1")
            return _error(
                403, f"requests from origin '{shown}' are not allowed; add it to cors", "origin_not_allowed"
            )
        if fetch_site in (b"cross-site", b"same-site"):  # a browser's request that carries no Origin
            return _error(403, "requests from other sites' pages are not allowed", "origin_not_allowed")
        return None

    def _carrying_a_key(self, got: dict[bytes, bytes]) -> set[bytes]:
        """The headers (authorization, x-api-key) that carry a valid key."""
        found = set()
        scheme, _, token = got.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and self._valid(token.strip()):
            found.add(b"authorization")
        if self._valid(got.get(b"x-api-key", b"").strip()):
            found.add(b"x-api-key")
        return found

    def _valid(self, given: bytes) -> bool:
        valid = False
        for key in self._keys:  # every key, in constant time each: no early answer to time
            valid |= hmac.compare_digest(given, key)
        return valid

    @staticmethod
    def _preflight(origin: bytes, cors: bool, requested: bytes | None) -> ASGIApp:
        """The answer to a CORS preflight. Browsers send no credentials with one, so it needs
        no key; it is sent as is, past `_reply`, which would drop its headers."""
        if not cors:  # a same-origin page asking: only `cors` grants CORS
            return _error(403, "this origin is not allowed by cors", "origin_not_allowed")
        response = Response(status_code=204)
        requested = (requested or b"").strip()
        # the origin is trusted: allow whatever headers its client sends (OpenAI SDKs send many)
        allow = requested if _TOKENS.fullmatch(requested) else ALLOW_HEADERS
        response.raw_headers.extend(
            [
                (b"access-control-allow-origin", origin),
                (b"access-control-allow-methods", ALLOW_METHODS),
                (b"access-control-allow-headers", allow),
                (b"access-control-max-age", MAX_AGE),
                (b"vary", b"Origin"),
            ]
        )
        return response

    def _reply(self, send: Send, origin: bytes | None) -> Send:
        """`send`, with upstream CORS headers dropped and this server's own added."""
        vary = bool(self.origins)

        async def reply(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", ())
                    if not name.lower().startswith(_ACCESS_CONTROL)
                ]
                if vary:
                    headers.append((b"vary", b"Origin"))
                if origin is not None:
                    headers.append((b"access-control-allow-origin", origin))
                message = {**message, "headers": headers}
            await send(message)

        return reply
