"""The OpenAI-compatible proxy: a Starlette app that finds the model a request names, has
the swapper make it ready, and streams the request through. Errors become OpenAI error
JSON in one place, `error_response`.

The model comes from the JSON body's `model`, a multipart form's `model` field (read as
the upload streams; the file is forwarded untouched), `?model=` on any other route, or
the path of `/upstream/<model>/<path>`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from swapctl.errors import BackendError, Busy, StartError, SwapctlError, UnknownModelError
from swapctl.forms import ModelField, boundary_of, replace_model
from swapctl.swapper import Slot, Swapper

log = logging.getLogger("swapctl")

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}

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


class RequestError(SwapctlError):
    """The client's request is wrong; answered with `status`."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def error_body(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(error: Exception) -> JSONResponse:
    if isinstance(error, RequestError):
        return JSONResponse(error_body(str(error), "invalid_request_error", error.code), error.status)
    if isinstance(error, UnknownModelError):
        return JSONResponse(error_body(str(error), "invalid_request_error", "model_not_found"), 404)
    if isinstance(error, Busy):
        body = error_body(str(error), "rate_limit_error", "model_busy")
        return JSONResponse(body, 429, headers={"retry-after": "1"})
    if isinstance(error, StartError):
        return JSONResponse(error_body(str(error), "server_error", "model_start_failed"), 502)
    if isinstance(error, BackendError):
        return JSONResponse(error_body(str(error), "server_error", "backend_error"), 503)
    log.error("unexpected error: %r", error, exc_info=error)
    return JSONResponse(error_body(f"internal error: {error!r}", "server_error", "internal_error"), 500)


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def record(swapper: Swapper, model: str, code: int, began: float) -> None:
    swapper.metrics.requests.labels(model, str(code)).inc()
    swapper.metrics.request_seconds.labels(model).observe(time.perf_counter() - began)


class Forwarded(StreamingResponse):
    """A streamed upstream response that always closes upstream and ends its lease,
    whether the stream ends, fails, or the client goes away first."""

    def __init__(self, upstream: httpx.Response, swapper: Swapper, slot: Slot, began: float) -> None:
        self.upstream, self.swapper, self.slot, self.began = upstream, swapper, slot, began
        headers = _headers(upstream.headers)
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
            log.warning("%s: upstream broke off mid-response: %r", self.slot.model, error)
            await self.swapper.confirm_alive(self.slot)
            if not self.events:
                raise  # abort the response: the client sees it cut, not complete
            # an event stream can still say why it ends, after its last whole event (the
            # broken one is dropped): OpenAI clients raise on an error event
            message = f"model '{self.slot.model}': its server broke off mid-response ({error!r})"
            event = error_body(message, "server_error", "upstream_broke_off")
            yield f"data: {json.dumps(event)}\n\n".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()
            await self.swapper.release(self.slot)
            record(self.swapper, self.slot.model, self.status_code, self.began)


async def _send_once(
    client: httpx.AsyncClient, request: httpx.Request, content: bytes | AsyncIterator[bytes]
) -> httpx.Response:
    try:
        return await client.send(request, stream=True)
    except (httpx.RemoteProtocolError, httpx.ReadError):
        # a kept-alive connection the server had already closed or reset (llama-server does
        # so after streamed responses) before any answer: send the request once more
        if not isinstance(content, bytes):
            raise
        return await client.send(request, stream=True)


def _small(response: httpx.Response) -> bool:
    """A known, small length and not an event stream: read it whole rather than stream it."""
    length = response.headers.get("content-length", "")
    events = response.headers.get("content-type", "").startswith("text/event-stream")
    return length.isdigit() and int(length) <= 2**20 and not events


def _json_model(body: bytes) -> tuple[str, dict[str, Any]]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}", "invalid_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "the request body must be a JSON object", "invalid_json")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError(400, "the request names no model: 'model' must be a string", "missing_model")
    return model, payload


class Body:
    """A request body read as it arrives, refused past `limit` bytes."""

    def __init__(self, request: Request, limit: int) -> None:
        length = request.headers.get("content-length", "")
        self.declared = int(length) if length.isdigit() else None
        if self.declared is not None and self.declared > limit:
            raise self.too_large(limit)
        self.chunked = "transfer-encoding" in request.headers
        self.stream = request.stream()
        self.limit = limit
        self.seen = 0

    def content(self) -> bytes | AsyncIterator[bytes]:
        """What to send on: nothing when the request declares no body, else its chunks."""
        return self.chunks() if self.declared or self.chunked else b""

    @staticmethod
    def too_large(limit: int) -> RequestError:
        return RequestError(
            413, f"the request body is larger than maxRequestBytes ({limit} bytes)", "too_large"
        )

    async def chunks(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            self.seen += len(chunk)
            if self.seen > self.limit:
                raise self.too_large(self.limit)
            yield chunk

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])


def build_app(
    swapper: Swapper, check_interval: float = 1.0, stop_on_exit: bool = False, preload: bool = True
) -> Starlette:
    config = swapper.config
    client = swapper.client
    created = int(time.time())
    longest_first = sorted({*config.models, *config.aliases}, key=len, reverse=True)  # IDs may hold '/'

    def resolve(name: str) -> str:
        model = config.resolve(name)
        if model is None:
            raise UnknownModelError(name)
        return model

    async def send(
        model: str, request: Request, path: str, content: bytes | AsyncIterator[bytes], length: int | None
    ) -> Response:
        headers = _headers(request.headers)
        if length is not None:
            headers["content-length"] = str(length)
        query = f"?{request.url.query}" if request.url.query else ""
        began = time.perf_counter()
        for attempt in (1, 2):
            slot = await swapper.acquire(model)
            try:
                assert slot.container is not None
                url = slot.container.url + path + query
                upstream_request = client.build_request(request.method, url, headers=headers, content=content)
                upstream = await _send_once(client, upstream_request, content)
                if not _small(upstream):
                    return Forwarded(upstream, swapper, slot, began)
                try:  # a small, complete answer: one write, none of a stream's machinery
                    # raw, as a stream is: aread() would undo a Content-Encoding that is passed on
                    body = b"".join([chunk async for chunk in upstream.aiter_raw()])
                finally:
                    await upstream.aclose()
                await swapper.release(slot)
                record(swapper, model, upstream.status_code, began)
                return Response(body, upstream.status_code, headers=_headers(upstream.headers))
            except BaseException as error:
                await swapper.release(slot)
                if isinstance(error.__cause__, RequestError):
                    raise error.__cause__ from None
                if not isinstance(error, httpx.TransportError):
                    raise
                alive = await swapper.confirm_alive(slot)
                # the container died before this request reached it: start it again, once
                if (
                    alive
                    or attempt == 2
                    or not isinstance(content, bytes)
                    or not isinstance(error, httpx.ConnectError)
                ):
                    raise BackendError(f"the model's server did not answer: {error!r}", model) from None
                log.info("%s: its container had died; starting it again for this request", model)
        raise AssertionError("unreachable")

    async def forward(request: Request) -> Response:
        body = Body(request, config.max_request_bytes)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            return await forward_form(request, body, content_type)
        raw = await body.read()
        name, payload = _json_model(raw)
        model = resolve(name)
        upstream_name = config.models[model].use_model_name
        if upstream_name:
            raw = json.dumps({**payload, "model": upstream_name}).encode()
        return await send(model, request, request.url.path, raw, len(raw))

    async def forward_form(request: Request, body: Body, content_type: str) -> Response:
        boundary = boundary_of(content_type)
        if boundary is None:
            raise RequestError(400, "a multipart body needs a boundary in its content-type", "invalid_form")
        field, prefix = ModelField(boundary), []
        chunks = body.chunks()
        async for chunk in chunks:
            prefix.append(chunk)
            field.feed(chunk)
            if field.done:
                break
        if not field.done:
            raise RequestError(400, "the form has no 'model' field", "missing_model")
        model = resolve(field.value.decode(errors="replace"))
        head = b"".join(prefix)
        upstream_name = config.models[model].use_model_name
        if upstream_name:
            head = replace_model(head, boundary, field.value, upstream_name.encode())
        length = body.declared + len(head) - sum(map(len, prefix)) if body.declared is not None else None

        async def rest() -> AsyncIterator[bytes]:
            yield head
            async for chunk in chunks:
                yield chunk

        return await send(model, request, request.url.path, rest(), length)

    async def upstream(request: Request) -> Response:
        """`/upstream/<model>/<path>`: any method, untouched, for a model's own UI or API."""
        rest = request.path_params["rest"]
        name = next((n for n in longest_first if rest == n or rest.startswith(n + "/")), None)
        if name is None:
            raise UnknownModelError(rest.split("/")[0])
        return await pass_on(resolve(name), request, rest[len(name) :] or "/")

    async def by_query(request: Request) -> Response:
        """Any other route, with `?model=`; without it, no such route."""
        name = request.query_params.get("model")
        if not name:
            known = request.url.path in MODEL_ROUTES or request.url.path in fixed
            status, code = (405, "method_not_allowed") if known else (404, "not_found")
            raise RequestError(status, f"no route {request.method} {request.url.path}", code)
        return await pass_on(resolve(name), request, request.url.path)

    async def pass_on(model: str, request: Request, path: str) -> Response:
        """Forward a request untouched, its body streamed on as it arrives."""
        body = Body(request, config.max_request_bytes)
        return await send(model, request, path, body.content(), body.declared)

    async def models(request: Request) -> Response:
        data = [
            {
                "id": m,
                "object": "model",
                "created": created,
                "owned_by": "swapctl",
                "aliases": list(c.aliases),
            }
            for m, c in config.models.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(request: Request) -> Response:
        return PlainTextResponse("OK")

    async def running(request: Request) -> Response:
        statuses = [s.to_json() for s in swapper.status()]
        return JSONResponse({"running": [s for s in statuses if s["state"] != "stopped"], "models": statuses})

    async def unload(request: Request) -> Response:
        name = request.path_params.get("model")
        return JSONResponse({"unloaded": await swapper.unload(resolve(name) if name else None)})

    async def not_found(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 404)
        message = f"no route {request.method} {request.url.path}"
        kind = "method_not_allowed" if status == 405 else "not_found"
        return JSONResponse(error_body(message, "invalid_request_error", kind), status)

    async def failed(request: Request, error: Exception) -> Response:
        response = error_response(error)
        model = getattr(error, "model", None)
        if isinstance(model, str) and model in config.models:
            swapper.metrics.requests.labels(model, str(response.status_code)).inc()
        return response

    async def metrics(request: Request) -> Response:
        return Response(swapper.metrics.render(), media_type="text/plain; version=0.0.4")

    async def logs(request: Request) -> Response:
        """The proxy's recent log lines; `/logs/<model>`: the model container's last lines."""
        name = request.path_params.get("model")
        if not name:
            return PlainTextResponse("\n".join(recent.lines) + "\n")
        slot = swapper.slots[resolve(name)]
        found = slot.container or next(
            (
                c
                for c in await asyncio.to_thread(swapper.backend.list, config.instance)
                if c.model == slot.model
            ),
            None,
        )
        text = await asyncio.to_thread(swapper.backend.logs, found.id, 200) if found else ""
        return PlainTextResponse(text)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.addHandler(recent)
        watcher = asyncio.create_task(_watch(swapper, check_interval))
        loading = asyncio.create_task(preload_models(swapper)) if preload else None
        try:
            yield
        finally:
            for task in (watcher, loading):
                if task is not None:
                    task.cancel()
            if stop_on_exit:
                await swapper.unload()
            await client.aclose()
            log.removeHandler(recent)

    any_method = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]
    fixed = ("/v1/models", "/health", "/running", "/unload", "/metrics", "/logs")
    recent = RecentLines()
    routes = [Route(path, forward, methods=["POST"]) for path in MODEL_ROUTES]
    routes += [
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/running", running, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/logs", logs, methods=["GET"]),
        Route("/logs/{model:path}", logs, methods=["GET"]),
        Route("/unload", unload, methods=["GET", "POST"]),
        Route("/unload/{model:path}", unload, methods=["GET", "POST"]),
        Route("/upstream/{rest:path}", upstream, methods=any_method),
        Route("/{path:path}", by_query, methods=any_method),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_found, SwapctlError: failed, Exception: failed},
    )


class RecentLines(logging.Handler):
    """The last lines logged, for GET /logs."""

    def __init__(self, keep: int = 1000) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def _watch(swapper: Swapper, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await swapper.check()
        except SwapctlError as error:
            log.warning("checking containers: %s", error)


async def preload_models(swapper: Swapper) -> None:
    """Start the configured models one by one, as requests would: the matrix still decides."""
    for model in swapper.config.preload:
        try:
            await swapper.release(await swapper.acquire(model))
        except SwapctlError as error:
            log.error("preload: %s", error)
