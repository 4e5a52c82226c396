"""Forwarding: find the model a request names, have the swapper make it ready, pass the
request on and its answer back.

The model comes from the JSON body's `model`, a multipart form's `model` field (the file is
forwarded untouched), `?model=` on any other route, or the path of
`/upstream/<model>/<path>`. Bodies are read whole, with a bound, before any model is
touched; a client that leaves is forgotten quietly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Collection, Coroutine, Mapping
from typing import Any
from urllib.parse import quote

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from swapctl.config import Config
from swapctl.errors import BackendError, RequestError, UnknownModelError
from swapctl.lifecycle import Lease, Swapper
from swapctl.metrics import Metrics
from swapctl.proxy.errors import ClientGone, error_body
from swapctl.proxy.forms import ModelField, boundary_of, replace_model

log = logging.getLogger("swapctl")

# POST routes whose body names the model (JSON, or a multipart form for uploads).
MODEL_ROUTES = (
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
    "/v1/rerank",
    "/v1/reranking",
    "/rerank",
)
HOP_BY_HOP = frozenset(
    {
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "proxy-connection",
    }
)  # and `connection`, with every header it names
_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar: a path keeps them as they are
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
SMALL = 2**20  # answers of a known length up to this are read whole and sent in one piece


def end_to_end(headers: Mapping[str, str]) -> dict[str, str]:
    """The end-to-end headers: without the hop-by-hop ones, nor those that `Connection` names
    (RFC 9110 7.6.1) so that no header meant for one hop goes further. One pass; `Connection`
    is read from the result (Starlette's and httpx's names are lower-case) as a lookup there
    is cheaper than one in `headers`."""
    kept = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
    named = kept.pop("connection", None)
    if named:
        for token in named.split(","):
            kept.pop(token.strip().lower(), None)
    return kept


def upstream_headers(request: Request) -> dict[str, str]:
    """What a request sends on: its end-to-end headers, and its client's address appended to
    `X-Forwarded-For` (only passed on: swapctl trusts it for nothing)."""
    headers = end_to_end(request.headers)
    if request.client is not None:
        prior = headers.get("x-forwarded-for")
        headers["x-forwarded-for"] = f"{prior}, {request.client.host}" if prior else request.client.host
    return headers


def _too_large(limit: int) -> RequestError:
    return RequestError(413, f"the request body is larger than maxRequestBytes ({limit} bytes)", "too_large")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused past `limit` bytes. It is read before any model is touched,
    so a client that leaves mid-upload, or a malformed body, starts and stops nothing."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def json_model(body: bytes) -> tuple[str, dict[str, Any]]:
    """The model a JSON body names, and the body parsed."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as error:  # also too deep, or an integer too long
        raise RequestError(400, f"the request body is not valid JSON: {error}", "invalid_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object", "invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "the request names no model: 'model' must be a string", "missing_model")
    return model, payload


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


async def unless_gone(receive: Receive, work: Coroutine[Any, Any, Response]) -> Response:
    """`work`'s answer; or, if the client leaves first, `work` cancelled (which cancels the
    wait for a start or the upstream request, and ends the lease) and ClientGone."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _send_once(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    try:
        return await client.send(request, stream=True)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        # a kept-alive connection the server had already closed or reset (llama-server does
        # so after streamed responses) before any answer: send the request once more
        return await client.send(request, stream=True)


def _small(response: httpx.Response) -> bool:
    """A known, small length and not an event stream: read it whole rather than stream it."""
    length = response.headers.get("content-length", "")
    events = response.headers.get("content-type", "").startswith("text/event-stream")
    return length.isdigit() and int(length) <= SMALL and not events


class Forwarder:
    """The forwarding routes. `known` are the paths other routes answer (for 405 or 404)."""

    def __init__(
        self,
        config: Config,
        swapper: Swapper,
        client: httpx.AsyncClient,
        metrics: Metrics,
        known: Collection[str] = (),
    ) -> None:
        self.config, self.swapper, self.client, self.metrics = config, swapper, client, metrics
        self.known = frozenset({*MODEL_ROUTES, *known})
        self.longest_first = sorted({*config.models, *config.aliases}, key=len, reverse=True)  # IDs hold '/'

    def resolve(self, name: str) -> str:
        model = self.config.resolve(name)
        if model is None:
            raise UnknownModelError(name)
        return model

    async def model_route(self, request: Request) -> Response:
        """A model route: the model named in the JSON body or the multipart form."""
        raw = await read_body(request, self.config.max_request_bytes)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            boundary = boundary_of(content_type)
            if boundary is None:
                raise RequestError(
                    400, "a multipart body needs a boundary in its content-type", "invalid_form"
                )
            name = form_model(raw, boundary)
            model = self.resolve(name.decode(errors="replace"))
            upstream_name = self.config.models[model].use_model_name
            if upstream_name:
                raw = replace_model(raw, boundary, name, upstream_name.encode())
        else:
            text, payload = json_model(raw)
            model = self.resolve(text)
            upstream_name = self.config.models[model].use_model_name
            if upstream_name:
                raw = json.dumps({**payload, "model": upstream_name}).encode()
        return await self._send(model, request, request.url.path, raw)

    async def upstream(self, request: Request) -> Response:
        """`/upstream/<model>/<path>`: any method, untouched, for a model's own UI or API."""
        rest = request.path_params["rest"]
        name = next((n for n in self.longest_first if rest == n or rest.startswith(n + "/")), None)
        if name is None:
            raise UnknownModelError(rest.split("/")[0])
        return await self._pass_on(self.resolve(name), request, rest[len(name) :] or "/")

    async def by_query(self, request: Request) -> Response:
        """Any other route, with `?model=`; without it, no such route."""
        name = request.query_params.get("model")
        if not name:
            path = request.url.path
            known = path in self.known or path.startswith(("/unload/", "/logs/"))
            status, code = (405, "method_not_allowed") if known else (404, "not_found")
            raise RequestError(status, f"no route {request.method} {path}", code)
        return await self._pass_on(self.resolve(name), request, request.url.path)

    async def _pass_on(self, model: str, request: Request, path: str) -> Response:
        """Forward a request untouched; its path as the client spelled it (quoted again)."""
        raw = await read_body(request, self.config.max_request_bytes)
        return await self._send(model, request, quote(path, safe=_PATH_SAFE), raw)

    async def _send(self, model: str, request: Request, path: str, content: bytes) -> Response:
        """Forward a request whose body is read; nothing more is done once its client leaves."""
        try:
            return await unless_gone(request.receive, self._exchange(model, request, path, content))
        except ClientGone:
            raise ClientGone(model) from None

    async def _exchange(self, model: str, request: Request, path: str, content: bytes) -> Response:
        headers = upstream_headers(request)
        if content or "content-length" in request.headers or "transfer-encoding" in request.headers:
            headers["content-length"] = str(len(content))
        target = path + (f"?{request.url.query}" if request.url.query else "")
        began = time.perf_counter()
        for attempt in (1, 2):
            async with await self.swapper.acquire(model) as lease:
                try:
                    return await self._answer(lease, request.method, target, headers, content, began)
                except httpx.TransportError as error:
                    # the container died before this request reached it: start it again, once
                    alive = await self.swapper.confirm_alive(lease)
                    if alive or attempt == 2 or not isinstance(error, httpx.ConnectError):
                        raise BackendError(f"the model's server did not answer: {error!r}", model) from None
            log.info("%s: its container had died; starting it again for this request", model)
        raise AssertionError("unreachable")

    async def _answer(
        self, lease: Lease, method: str, target: str, headers: dict[str, str], content: bytes, began: float
    ) -> Response:
        request = self.client.build_request(method, lease.url + target, headers=headers, content=content)
        upstream = await _send_once(self.client, request)
        if not _small(upstream):
            return Forwarded(upstream, lease.hand_over(), self, began)
        try:  # a small, complete answer: one write, none of a stream's machinery
            # raw, as a stream is: aread() would undo a Content-Encoding that is passed on
            body = b"".join([chunk async for chunk in upstream.aiter_raw()])
        finally:
            await upstream.aclose()
        self.record(lease.model, upstream.status_code, began)
        return Response(body, upstream.status_code, headers=end_to_end(upstream.headers))

    def record(self, model: str, code: int, began: float) -> None:
        self.metrics.requests.labels(model, str(code)).inc()
        self.metrics.request_seconds.labels(model).observe(time.perf_counter() - began)


class Forwarded(StreamingResponse):
    """A streamed upstream answer that always closes upstream and ends its lease, whether
    the stream ends, fails, or the client goes away first."""

    def __init__(self, upstream: httpx.Response, lease: Lease, forwarder: Forwarder, began: float) -> None:
        self.upstream, self.lease, self.forwarder, self.began = upstream, lease, forwarder, began
        headers = end_to_end(upstream.headers)
        if "content-length" in upstream.headers:
            headers["content-length"] = upstream.headers["content-length"]
        # plain event streams are passed on whole events at a time, so a break can be reported
        self.events = upstream.headers.get("content-type", "").startswith("text/event-stream") and (
            "content-encoding" not in upstream.headers
        )
        super().__init__(self._chunks(), status_code=upstream.status_code, headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        pending = b""
        try:
            async for chunk in self.upstream.aiter_raw():
                if not self.events:
                    yield chunk
                    continue
                pending += chunk
                end = max((m.end() for m in _EVENT_END.finditer(pending)), default=0)
                if end:
                    yield pending[:end]
                    pending = pending[end:]
            if pending:
                yield pending
        except httpx.TransportError as error:
            model = self.lease.model
            log.warning("%s: upstream broke off mid-response: %r", model, error)
            await self.forwarder.swapper.confirm_alive(self.lease)
            if not self.events:
                raise  # abort the response: the client sees it cut, not complete
            # an event stream can still say why it ends, after its last whole event (the
            # broken one is dropped): OpenAI clients raise on an error event
            message = f"model '{model}': its server broke off mid-response ({error!r})"
            event = error_body(message, "server_error", "upstream_broke_off")
            yield f"data: {json.dumps(event)}\n\n".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()
            await self.lease.release()
            self.forwarder.record(self.lease.model, self.status_code, self.began)
