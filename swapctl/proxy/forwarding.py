"""Forwarding: find the model a request names, have the swapper make it ready, pass the
request on and its answer back.

The model comes from the JSON body's `model`, a multipart form's `model` field (the file is
forwarded untouched), `?model=` on any other route, or the path of
`/upstream/<model>/<path>`. Bodies are read whole, with a bound, before any model is
touched; a client that leaves is forgotten quietly. A streamed request whose model is not
ready waits after its response's head (`loading.py`); every other request before it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
import re
import time
from collections.abc import AsyncIterator, Awaitable, Collection, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from swapctl.config import Config, Routed, Timeouts
from swapctl.config.filters import Filters
from swapctl.errors import (
    BackendError,
    ElsewhereUnavailable,
    RequestError,
    UnknownModelError,
    UpstreamTimeout,
)
from swapctl.lifecycle import Fleet, Lease, Swapper, Ticket
from swapctl.metrics import Metrics
from swapctl.proxy.errors import (
    ANSWERS,
    ClientGone,
    error_answer,
    error_body,
    error_event,
    handlers,
    shutting_down,
)
from swapctl.proxy.forms import ModelField, boundary_of, replace_model
from swapctl.proxy.loading import Loading
from swapctl.proxy.record import Requests, cancelled_error
from swapctl.proxy.upstream import (
    Answer,
    BrokeOff,
    Dropped,
    RawHeaders,
    Tally,
    TimedOut,
    Unreachable,
    Upstream,
    UpstreamError,
    tokens_in,
)
from swapctl.remote import VIA, Places, There, Watch
from swapctl.remote.places import Sent

# the errors whose answer tells the client why (any other is a 500, and logged)
TOLD: tuple[type[Exception], ...] = (RequestError, *ANSWERS)
log = logging.getLogger("swapctl")
T = TypeVar("T")

# POST routes whose body names the model (JSON, or a multipart form for uploads); where it
# names none, `?model=` does.
MODEL_ROUTES = (
    # OpenAI's
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/audio/speech",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/images/variations",
    # Anthropic's (its errors in Anthropic's shape: proxy/errors.py)
    "/v1/messages",
    "/v1/messages/count_tokens",
    # llama.cpp's server's own, and Cohere/Jina's rerank
    "/completion",
    "/completions",
    "/infill",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/embedding",
    "/embeddings",
    "/rerank",
    "/reranking",
    "/v1/rerank",
    "/v1/reranking",
)
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"proxy-connection",
    }
)  # and every header that `Connection` names
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar: a path keeps them as they are
# vLLM's development routes that swapctl uses on a model with `sleep`: never passed on for one
SLEEP_ROUTES = frozenset({"/sleep", "/wake_up", "/is_sleeping", "/collective_rpc"})
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
SMALL = 2**20  # answers of a known length up to this are read whole and sent in one piece
NO_BUFFERING = (b"x-accel-buffering", b"no")  # reverse proxies (nginx) pass each event at once


def end_to_end(raw: RawHeaders) -> list[tuple[bytes, bytes]]:
    """The end-to-end headers, names lower-cased, repeats kept: without the hop-by-hop ones,
    nor those that `Connection` names (RFC 9110 7.6.1), so that no header meant for one hop
    goes further. One pass; a second only when a `Connection` header names others."""
    kept: list[tuple[bytes, bytes]] = []
    named: list[bytes] = []
    for name, value in raw:
        name = name.lower()
        if name not in HOP_BY_HOP:
            kept.append((name, value))
        elif name == b"connection":
            named.extend(token.strip().lower() for token in value.split(b","))
    return [(n, v) for n, v in kept if n not in named] if named else kept


def header(raw: RawHeaders, name: bytes) -> bytes | None:
    """The first value of a header (`name` lower-case) in lower-cased raw headers."""
    return next((value for key, value in raw if key == name), None)


def upstream_headers(scope: Scope, length: int | None) -> list[tuple[bytes, bytes]]:
    """What a request sends on: its end-to-end headers, its body's length, and its client's
    address appended to `X-Forwarded-For` (only passed on: swapctl trusts it for nothing)."""
    kept = end_to_end(scope["headers"])
    prior = header(kept, b"x-forwarded-for")
    headers = [(n, v) for n, v in kept if n != b"x-forwarded-for"] if prior is not None else kept
    if length is not None:
        headers.append((b"content-length", b"%d" % length))
    client = scope.get("client")
    if client:
        address = client[0].encode("latin-1")
        headers.append((b"x-forwarded-for", prior + b", " + address if prior else address))
    elif prior:
        headers.append((b"x-forwarded-for", prior))
    return headers


def events(raw: RawHeaders) -> bool:
    """Whether lower-cased headers announce an event stream."""
    return (header(raw, b"content-type") or b"").startswith(b"text/event-stream")


def _prefix(names: Iterable[str], rest: str) -> str | None:
    """The name (longest first) that `rest`, an `/upstream/` path, begins with."""
    return next((n for n in names if rest == n or rest.startswith(n + "/")), None)


def _for_peer(body: bytes | None, model: str, filters: Filters) -> bytes | None:
    """A JSON body for a peer: its filters applied, `model` named by its ID (a peer knows none
    of this config's aliases); any other body as it is."""
    if not body or not body.lstrip().startswith(b"{"):
        return body
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(payload, dict) or (payload.get("model") in (None, model) and not filters):
        return body
    named = filters.apply(payload, model) if filters else payload
    if named.get("model") not in (None, model):
        named = {**named, "model": model}
    return json.dumps(named, ensure_ascii=False).encode()


def peer_target(where: There, path: str, target: str) -> str:
    """What to ask a place elsewhere for: a peer (a swapctl, a llama-swap) keeps the
    `/upstream/<model>/` of a passthrough, naming the model by its ID; a `proxy:` model's
    server is asked for the path below it."""
    if where.place.peer is None or not path.startswith("/upstream/"):
        return target
    return f"/upstream/{quote(where.model, safe=_PATH_SAFE)}{target}"


def elsewhere_headers(where: There, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A request's headers for a place elsewhere: its key instead of the client's (where it
    has one), and this node added to X-Swapctl-Via."""
    place = where.place
    dropped = {VIA, b"authorization", b"x-api-key"} if place.api_key else {VIA}
    kept = [(n, v) for n, v in headers if n not in dropped]
    kept += [(n.encode(), v.encode()) for n, v in place.headers().items()]
    kept.append((VIA, where.via))
    return kept


class Hold(Protocol):
    """What a request holds while its answer comes: a Lease on a container, or a request Sent
    elsewhere."""

    model: str

    async def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Call:
    """The request to send to the model's server, but for the server's address."""

    method: str
    target: str  # path and query
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    timeouts: Timeouts  # the model's: how long its server may take


def _too_large(limit: int) -> RequestError:
    return RequestError(413, f"the request body is larger than maxRequestBytes ({limit} bytes)", "too_large")


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refused past `limit` bytes. It is read before any model is touched,
    so a client that leaves mid-upload, or a malformed body, starts and stops nothing."""
    length = header(scope["headers"], b"content-length") or b""
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    seen = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def json_model(body: bytes, fallback: str | None = None) -> tuple[str, dict[str, Any]]:
    """The model a JSON body names (else `fallback`, from `?model=`), and the body parsed."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # also too deep, or an integer too long
        raise RequestError(400, f"the request body is not valid JSON: {error}", "invalid_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object", "invalid_json")
    model = payload.get("model", fallback)
    if not isinstance(model, str) or not model:
        raise RequestError(400, "the request names no model: 'model' must be a string", "missing_model")
    return model, payload


def query_model(scope: Scope) -> str | None:
    """`?model=` of a request, if it has one: a model route's fallback."""
    query = scope["query_string"]
    if b"model=" not in query:  # the common case, without parsing
        return None
    return next((v for k, v in parse_qsl(query.decode("latin-1")) if k == "model" and v), None)


def form_model(body: bytes, boundary: bytes) -> bytes:
    """The `model` field of a whole multipart body; a malformed form is the client's error."""
    field = ModelField(boundary)
    try:
        field.feed(body)
    except ValueError as error:  # python-multipart's parse errors are ValueErrors
        raise RequestError(400, f"the multipart form is malformed: {error}", "invalid_form") from None
    if not field.done:
        raise RequestError(400, "the form has no 'model' field", "missing_model")
    return field.value


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(receive: Receive, work: Awaitable[T]) -> T:
    """`work`'s answer; or, if the client leaves first, `work` cancelled (which cancels the
    wait for a start or the upstream request, and ends the lease) and ClientGone.

    The work runs in the request's own task; one watcher task cancels that task if the
    client goes away, and never after the work is over."""
    task = asyncio.current_task()
    assert task is not None
    over = False

    def cancel(watcher: asyncio.Task[None]) -> None:
        if not over and not watcher.cancelled() and watcher.exception() is None:
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(_disconnected(receive))
    watcher.add_done_callback(cancel)
    try:
        return await work
    except asyncio.CancelledError:
        if not watcher.done() or watcher.cancelled() or task.uncancel() > 0:
            raise  # cancelled from elsewhere (shutdown): not ours to turn into an answer
        raise ClientGone from None
    finally:
        over = True
        watcher.cancel()


async def _send_once(upstream: Upstream, call: Call, base: str) -> Answer:
    try:
        return await upstream.send(call.method, base, call.target, call.headers, call.body, call.timeouts)
    except Dropped:
        # a kept-alive connection the server had already closed or reset (llama-server does
        # so after streamed responses) before any answer: send the request once more
        return await upstream.send(call.method, base, call.target, call.headers, call.body, call.timeouts)


def _small(answer: Answer) -> bool:
    """A known, small length and not an event stream: read it whole rather than stream it."""
    length = header(answer.raw_headers, b"content-length") or b""
    return length.isdigit() and int(length) <= SMALL and not events(answer.raw_headers)


class Whole(Response):
    """A complete answer sent in one write, its headers as the server gave them."""

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status_code, self.body, self.background = status, body, None
        self.raw_headers = [*raw_headers, (b"content-length", str(len(body)).encode())]


class Forwarder:
    """The forwarding routes. `known` are the paths other routes answer (for 405 or 404)."""

    def __init__(
        self,
        swapper: Swapper,
        upstream: Upstream,
        metrics: Metrics,
        known: Collection[str] = (),
        tick: float = 1.0,
        prefixes: tuple[str, ...] = (),
        places: Places | None = None,
        elsewhere: Upstream | None = None,
    ) -> None:
        """`tick`: seconds between two notes of progress to a streamed request that waits;
        `places` chooses where each request goes (here, a peer, a `proxy:` model's server),
        `elsewhere` reaches those servers (https included)."""
        self.swapper, self.servers, self.metrics = swapper, upstream, metrics
        self.places = places or Places(Fleet.alone(swapper), Watch(lambda: swapper.config.peers, None))
        self.elsewhere = elsewhere or upstream
        self.handlers = handlers(metrics, swapper.slots)  # live: a reload adds and drops slots
        self.known = frozenset({*MODEL_ROUTES, *known})
        self.prefixes = prefixes  # of other routes' paths: a wrong method there is a 405
        self.tick = tick
        self.requests = Requests(lambda: self.places.config, swapper.activity)  # every request on record

    @property
    def config(self) -> Config:
        """The whole config now (every host's models): a reload replaces it, so requests read
        it here."""
        return self.places.config

    @property
    def longest_first(self) -> tuple[str, ...]:
        return self.config.longest_names

    def resolve(self, name: str) -> str:
        """A model this box runs, for swapctl's own routes (logs, plan, load, unload); requests
        resolve through `places`, which knows the models served elsewhere too."""
        model = self.config.resolve(name)
        if model is None:
            raise UnknownModelError(name)
        if model not in self.config.models:
            message = f"model '{model}' is served elsewhere (a proxy: model): swapctl runs nothing for it"
            raise RequestError(400, message, "model_elsewhere")
        return model

    def _routed(self, model: str) -> Routed | None:
        """How the config forwards requests for `model`; None for a model only peers serve."""
        config = self.config
        return config.models.get(model) or config.remotes.get(model)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A model route, as a plain ASGI app: the hot path goes past Starlette's router and
        request objects; its errors are answered by the same table as every other route's."""
        try:
            response = await self.model_route(scope, receive)
        except Exception as error:
            response = await self.answer_error(Request(scope, receive), error)
        await response(scope, receive, send)

    async def model_request(self, request: Request) -> Response:
        """A model route through Starlette's router (as tests and other methods reach it)."""
        return await self.model_route(request.scope, request.receive)

    async def model_route(self, scope: Scope, receive: Receive) -> Response:
        """A model route: the model named in the JSON body or the multipart form. A request
        refused before it is routed (no such model, a body that names none) is on record too."""
        began = time.perf_counter()
        try:
            model, raw, streamed = await self._routed_body(scope, receive)
        except ClientGone:
            self.requests.refused(scope, None, 499, "the client left before its request was read", began)
            raise
        except TOLD as error:
            named = error.name if isinstance(error, UnknownModelError) else None
            status, body = error_answer(error)
            self.requests.refused(scope, named, status, body["error"]["message"], began)
            raise
        return await self._send(model, scope, receive, scope["path"], raw, streamed)

    async def _routed_body(self, scope: Scope, receive: Receive) -> tuple[str, bytes, bool]:
        """The model a request is for, the body to send it (filtered) and whether it streams."""
        raw = await read_body(scope, receive, self.config.max_request_bytes)
        content_type = (header(scope["headers"], b"content-type") or b"").decode("latin-1")
        if content_type.startswith("multipart/form-data"):
            boundary = boundary_of(content_type)
            if boundary is None:
                raise RequestError(
                    400, "a multipart body needs a boundary in its content-type", "invalid_form"
                )
            name = form_model(raw, boundary)
            model = self.places.resolve(name.decode(errors="replace"))
            routed = self._routed(model)
            upstream_name = routed.use_model_name if routed is not None else None
            if upstream_name:
                raw = replace_model(raw, boundary, name, upstream_name.encode())
            return model, raw, False
        fallback = query_model(scope)
        if not raw.strip() and fallback:  # llama.cpp's GET-like routes, POSTed bare
            return self.places.resolve(fallback), raw, False
        text, payload = json_model(raw, fallback)
        model = self.places.resolve(text)
        return model, self.filtered(model, text, payload) or raw, payload.get("stream") is True

    def filtered(self, model: str, requested: str, payload: dict[str, Any]) -> bytes | None:
        """The body to send for a JSON request that named `requested`: the model's filters
        applied, `useModelName` put in; None when neither changes anything (sent as it came)."""
        found = self._routed(model)
        if found is None:  # a peer's model: the peer has its own filters
            return None
        if not found.filters and not found.use_model_name:
            return None
        if found.filters:
            payload = found.filters.apply(payload, requested)
        if found.use_model_name and "model" in payload:
            payload = {**payload, "model": found.use_model_name}
        return json.dumps(payload, ensure_ascii=False).encode()

    async def upstream(self, request: Request) -> Response:
        """`/upstream/<model>/<path>`: any method, untouched, for a model's own UI or API."""
        rest = request.path_params["rest"]
        name = self.upstream_name(rest)
        if name is None:
            raise UnknownModelError(rest.split("/")[0])
        if rest == name and request.method in ("GET", "HEAD"):
            return self._to_root(name, request.scope["query_string"])
        return await self._pass_on(self.places.resolve(name), request, rest[len(name) :] or "/")

    def upstream_name(self, rest: str) -> str | None:
        """The model name an `/upstream/` path begins with: a model, alias or variant here
        (longest first: an ID may hold '/'), else a model only peers serve."""
        name = _prefix(self.longest_first, rest)
        if name is None:
            name = _prefix(sorted({m for m, _ in self.places.offered()}, key=len, reverse=True), rest)
        return name

    @staticmethod
    def _to_root(name: str, query: bytes) -> Response:
        """`/upstream/<model>` to `/upstream/<model>/`, where a web UI's relative links resolve,
        the model not started. Relative, so that a prefix a reverse proxy adds is kept."""
        location = "./" + quote(name.rpartition("/")[2], safe=_PATH_SAFE) + "/"
        location += f"?{query.decode('latin-1')}" if query else ""
        return Response(status_code=308, headers={"location": location})

    async def by_query(self, request: Request) -> Response:
        """Any other route, with `?model=`; without it, no such route."""
        name = request.query_params.get("model")
        if not name:
            path = request.url.path
            known = path in self.known or path.startswith(self.prefixes)
            status, code = (405, "method_not_allowed") if known else (404, "not_found")
            raise RequestError(status, f"no route {request.method} {path}", code)
        return await self._pass_on(self.places.resolve(name), request, request.url.path)

    async def _pass_on(self, model: str, request: Request, path: str) -> Response:
        """Forward a request untouched; its path as the client spelled it (quoted again). A
        model that swapctl puts to sleep keeps its sleep routes to swapctl alone: a sleep
        behind its back would leave it forwarding to a sleeping server."""
        found = self.config.models.get(model)
        if (
            found is not None
            and found.sleep is not None
            and posixpath.normpath("/" + path.lstrip("/")) in SLEEP_ROUTES
        ):
            message = f"model '{model}': {path} is swapctl's own (it puts this model to sleep and wakes it)"
            raise RequestError(403, message, "forbidden")
        raw = await read_body(request.scope, request.receive, self.config.max_request_bytes)
        return await self._send(model, request.scope, request.receive, quote(path, safe=_PATH_SAFE), raw)

    async def _send(
        self, model: str, scope: Scope, receive: Receive, path: str, content: bytes, streamed: bool = False
    ) -> Response:
        """Forward a request whose body is read; nothing more is done once its client leaves
        (or once it is cancelled: POST /requests/<id>/cancel)."""
        entry = self.requests.begin(model, scope, content)
        try:
            return await unless_gone(receive, self._exchange(model, scope, path, content, streamed))
        except ClientGone:
            self.requests.end(model, 499)
            raise ClientGone(model) from None
        except asyncio.CancelledError:
            if (cancelled := self.requests.cancelled()) is not None:
                error: Exception = cancelled_error(model, cancelled.id)
            elif (shutdown := shutting_down(model)) is not None:
                error = shutdown
            else:
                raise
            if entry is not None:
                self.requests.end(model, error_answer(error)[0])
            raise error from None  # an OpenAI error, not the server's bare 500 and a traceback
        except Exception as error:
            if entry is not None:
                self.requests.end(model, error_answer(error)[0])
            raise

    async def _exchange(
        self, model: str, scope: Scope, path: str, content: bytes, streamed: bool
    ) -> Response:
        raw = scope["headers"]
        declared = header(raw, b"content-length") is not None or header(raw, b"transfer-encoding") is not None
        sized = content or declared
        headers = upstream_headers(scope, len(content) if sized else None)
        query = scope["query_string"]
        target = f"{path}?{query.decode('latin-1')}" if query else path
        began = time.perf_counter()
        where = await self.places.choose(model, scope)  # a loop, every place down: a plain answer
        if isinstance(where, There):
            self.requests.went(where.place.label)
            target = peer_target(where, scope["path"], target)
            call = Call(scope["method"], target, headers, content if sized else None, where.place.timeouts)
            return await self._elsewhere(where, call, began)
        timeouts = self.config.models[model].timeouts
        call = Call(scope["method"], target, headers, content if sized else None, timeouts)
        # busy, unknown, stop-failed: a plain answer
        swapper = self.places.swapper_of(where)
        ticket = await swapper.admit(model)
        self.requests.went(where.host, None if ticket.ready else swapper.activity.swaps)
        if streamed and not ticket.ready:
            return self._loading(ticket, call, path, began)
        lease, answer = await self.open(ticket, call)
        return await self._answer(lease, answer, began)

    async def _elsewhere(self, where: There, call: Call, began: float) -> Response:
        """Forward to a peer or a `proxy:` model's server (`elsewhere_headers`), the model
        named by its ID (a peer knows no alias of this config). A server that does not answer
        counts against its circuit."""
        place = where.place
        headers = elsewhere_headers(where, call.headers)
        body = _for_peer(call.body, where.model, place.peer.filters) if place.peer is not None else call.body
        if body is not call.body and body is not None:
            headers = [(n, b"%d" % len(body) if n == b"content-length" else v) for n, v in headers]
        sent = Sent(where, self.places)
        try:
            answer = await _send_once(self.elsewhere, replace(call, headers=headers, body=body), place.url)
        except UpstreamError as error:
            await sent.release()
            place.failed(str(error))
            if isinstance(error, TimedOut):
                raise UpstreamTimeout(f"{place.label} timed out: {error}", where.model) from None
            raise ElsewhereUnavailable(f"{place.label} did not answer: {error}", where.model) from None
        except BaseException:
            await sent.release()
            raise
        place.answered()
        return await self._answer(sent, answer, began)

    def _loading(self, ticket: Ticket, call: Call, path: str, began: float) -> Response:
        """The head now; the wait, its progress, then the answer in the body. Asked for an
        identity body: the head, sent before the answer, says no Content-Encoding."""
        plain = replace(call, headers=[(n, v) for n, v in call.headers if n != b"accept-encoding"])
        chat = path == "/v1/chat/completions" and self.config.models[ticket.model].send_loading_state
        return Loading(self, ticket, plain, began, path=path, tick=self.tick, reasoning=chat)

    async def open(self, ticket: Ticket, call: Call) -> tuple[Lease, Answer]:
        """The head of the model's answer, and the lease that holds the model for it: once
        ready, the request is sent; a container found dead before the request reached it is
        started again, once. Released on any failure."""
        lease = await ticket.lease()
        for attempt in (1, 2):
            try:
                answer = await _send_once(self.servers, call, lease.url)
            except TimedOut as error:  # a slow server, not a dead one: it stays up
                log.warning("%s: its server timed out: %s", lease.model, error)
                await lease.release()
                raise UpstreamTimeout(f"its server timed out: {error}", lease.model) from None
            except UpstreamError as error:
                owner: Swapper = lease.owner or self.swapper
                try:
                    alive = await owner.confirm_alive(lease)
                finally:
                    await lease.release()
                if alive or attempt == 2 or not isinstance(error, Unreachable):
                    raise BackendError(f"the model's server did not answer: {error}", lease.model) from None
                log.info("%s: its container had died; starting it again for this request", lease.model)
                lease = await owner.acquire(lease.model)
            except BaseException:
                await lease.release()
                raise
            else:
                return lease, answer
        raise AssertionError("unreachable")

    async def broke(self, hold: Hold, error: Exception) -> None:
        """An answer broke off: a container is checked (a crash returns its model to
        stopped); a server elsewhere counts a failure against its circuit."""
        if isinstance(hold, Sent):
            hold.place.failed(str(error))
        elif isinstance(hold, Lease):
            await (hold.owner or self.swapper).confirm_alive(hold)

    async def _answer(self, lease: Hold, answer: Answer, began: float) -> Response:
        if not _small(answer):
            return Forwarded(answer, lease, self, began)
        try:  # a small, complete answer: one write, none of a stream's machinery
            whole = await answer.read()
        except TimedOut as error:
            log.warning("%s: its server timed out: %s", lease.model, error)
            raise UpstreamTimeout(f"its server timed out: {error}", lease.model) from None
        except UpstreamError as error:
            await self.broke(lease, error)
            raise BackendError(f"the model's server did not answer: {error}", lease.model) from None
        finally:
            await answer.close()
            await lease.release()
        self.requests.whole(answer.raw_headers, whole)
        self.record(lease.model, answer.status, began, tokens_in(whole))
        return Whole(answer.status, end_to_end(answer.raw_headers), whole)

    async def relay(
        self, answer: Answer, lease: Hold, path: str, tally: Tally | None = None
    ) -> AsyncIterator[bytes]:
        """The answer's body as it arrives; a plain event stream whole events at a time, so
        that a break can be reported after the last one, in the error event the clients of the
        route at `path` raise on. The tokens the stream reports it generated go to `tally`."""
        raw = answer.raw_headers
        whole_events = events(raw) and header(raw, b"content-encoding") is None
        pending = b""
        try:
            async for chunk in answer.chunks():
                if tally is not None:
                    tally.seen(chunk)
                if not whole_events:
                    yield chunk
                    continue
                pending += chunk
                end = max((m.end() for m in _EVENT_END.finditer(pending)), default=0)
                if end:
                    yield pending[:end]
                    pending = pending[end:]
            if pending:
                yield pending
        except BrokeOff as error:
            model = lease.model
            log.warning("%s: upstream broke off mid-response: %s", model, error)
            slow = isinstance(error, TimedOut)  # stalled past timeouts.idle: slow, not dead
            if not slow:
                await self.broke(lease, error)
            if not whole_events:
                raise  # abort the response: the client sees it cut, not complete
            # the broken event is dropped
            message = f"model '{model}': its server broke off mid-response ({error})"
            status, code = (504, "upstream_timeout") if slow else (502, "upstream_broke_off")
            yield error_event(path, status, error_body(message, "server_error", code))

    def record(self, model: str, code: int, began: float, tokens: int | None = None) -> None:
        """One request answered: its status, its time, the tokens its answer reported."""
        took = time.perf_counter() - began
        self.metrics.requests.labels(model, str(code)).inc()
        self.metrics.request_seconds.labels(model).observe(took)
        self.swapper.activity.served(model, code, took, tokens)
        self.requests.end(model, code, tokens)

    async def answer_error(self, request: Request, error: Exception) -> Response:
        """The answer to an error of a model route: the app's handler for its type."""
        handler = next(self.handlers[k] for k in type(error).__mro__ if k in self.handlers)
        response: Response = await handler(request, error)
        return response


class Forwarded(Response):
    """A streamed upstream answer, relayed chunk by chunk, that always closes upstream and
    ends its lease, whether the stream ends, fails, or the client goes away first (which
    stops the relay at once: one watcher task, as for the request)."""

    def __init__(self, answer: Answer, lease: Hold, forwarder: Forwarder, began: float) -> None:
        self.answer, self.lease, self.forwarder, self.began = answer, lease, forwarder, began
        self.status_code, self.background = answer.status, None
        self.tally = forwarder.requests.tally(answer.raw_headers)
        raw = end_to_end(answer.raw_headers)
        length = header(answer.raw_headers, b"content-length")
        if events(raw) and header(raw, NO_BUFFERING[0]) is None:
            raw.append(NO_BUFFERING)
        self.raw_headers = [*raw, (b"content-length", length)] if length is not None else raw

    async def _relay(self, send: Send, path: str) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.forwarder.relay(self.answer, self.lease, path, self.tally):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await unless_gone(receive, self._relay(send, scope["path"]))
        except (ClientGone, OSError):  # gone: an ASGI 2.4 server may say so at a write
            pass
        except asyncio.CancelledError:
            if (cancelled := self.forwarder.requests.cancelled()) is None:
                raise
            if events(self.raw_headers):  # the error event its clients raise on
                status, body = error_answer(cancelled_error(self.lease.model, cancelled.id))
                event = error_event(scope["path"], status, body)
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.answer.close()
            await self.lease.release()
            self.forwarder.record(self.lease.model, self.status_code, self.began, self.tally.tokens)
