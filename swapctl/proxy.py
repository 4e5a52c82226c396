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
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from swapctl.errors import BackendError, Busy, StartError, SwapctlError, UnknownModelError
from swapctl.forms import ModelField, boundary_of, replace_model
from swapctl.guard import Guard
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
    "proxy-connection",
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


_HOP_BY_HOP_BUT_CONNECTION = HOP_BY_HOP - {"connection"}


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The end-to-end headers: without the hop-by-hop ones, nor those that `Connection` names
    (RFC 9110 7.6.1) so that no header meant for one hop goes further. One pass; `Connection`
    is read from the result (Starlette's and httpx's names are lower-case) as a lookup there
    is cheaper than one in `headers`."""
    kept = {k: v for k, v in headers.items() if k.lower() not in _HOP_BY_HOP_BUT_CONNECTION}
    named = kept.pop("connection", None)
    if named:
        for token in named.split(","):
            kept.pop(token.strip().lower(), None)
    return kept


def _upstream_headers(request: Request) -> dict[str, str]:
    """What a request sends on: its end-to-end headers, and its client's address appended to
    `X-Forwarded-For` (only passed on: swapctl trusts it for nothing)."""
    headers = _headers(request.headers)
    if request.client is not None:
        prior = headers.get("x-forwarded-for")
        headers["x-forwarded-for"] = f"{prior}, {request.client.host}" if prior else request.client.host
    return headers


_PATH_SAFE = "/:@!$&'()*+,;=-._~"  # RFC 3986 pchar: a path keeps them as they are
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
    return length.isdigit() and int(length) <= 2**20 and not events


def _json_model(body: bytes) -> tuple[str, dict[str, Any]]:
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


def _seconds(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise RequestError(
            400, f"'{name}' is a number of seconds from 0 to 3600, got {text!r}", "invalid_value"
        )
    return value


def _form_model(body: bytes, boundary: bytes) -> bytes:
    """The `model` field of a whole multipart body; a malformed form is the client's error."""
    field = ModelField(boundary)
    try:
        field.feed(body)
    except ValueError as error:  # python-multipart's parse errors are ValueErrors
        raise RequestError(400, f"the multipart form is malformed: {error}", "invalid_form") from None
    if not field.done:
        raise RequestError(400, "the form has no 'model' field", "missing_model")
    return field.value


class ClientGone(Exception):
    """The client went away before its answer was ready."""

    def __init__(self, model: str | None = None) -> None:
        super().__init__(model)
        self.model = model


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(receive: Receive, work: Coroutine[Any, Any, Response]) -> Response:
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


def build_app(
    swapper: Swapper,
    check_interval: float = 1.0,
    stop_on_exit: bool = False,
    preload: bool = True,
    listen_host: str | None = None,
) -> Starlette:
    """The app. `listen_host` (default: the config's `listen`) is the name the Host check
    accepts besides loopback names, IP addresses and `allowedHosts`."""
    config = swapper.config
    client = swapper.client
    created = int(time.time())
    longest_first = sorted({*config.models, *config.aliases}, key=len, reverse=True)  # IDs may hold '/'

    def resolve(name: str) -> str:
        model = config.resolve(name)
        if model is None:
            raise UnknownModelError(name)
        return model

    async def send(model: str, request: Request, path: str, content: bytes) -> Response:
        """Forward a request whose body is read; nothing more is done once its client leaves."""
        try:
            return await _unless_gone(request.receive, exchange(model, request, path, content))
        except ClientGone:
            raise ClientGone(model) from None

    async def exchange(model: str, request: Request, path: str, content: bytes) -> Response:
        headers = _upstream_headers(request)
        if content or "content-length" in request.headers or "transfer-encoding" in request.headers:
            headers["content-length"] = str(len(content))
        query = f"?{request.url.query}" if request.url.query else ""
        began = time.perf_counter()
        for attempt in (1, 2):
            slot = await swapper.acquire(model)
            try:
                assert slot.container is not None
                url = slot.container.url + path + query
                upstream_request = client.build_request(request.method, url, headers=headers, content=content)
                upstream = await _send_once(client, upstream_request)
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
                if alive or attempt == 2 or not isinstance(error, httpx.ConnectError):
                    raise BackendError(f"the model's server did not answer: {error!r}", model) from None
                log.info("%s: its container had died; starting it again for this request", model)
        raise AssertionError("unreachable")

    async def forward(request: Request) -> Response:
        """A model route: the model named in the JSON body or the multipart form."""
        raw = await read_body(request, config.max_request_bytes)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            boundary = boundary_of(content_type)
            if boundary is None:
                raise RequestError(
                    400, "a multipart body needs a boundary in its content-type", "invalid_form"
                )
            name = _form_model(raw, boundary)
            model = resolve(name.decode(errors="replace"))
            upstream_name = config.models[model].use_model_name
            if upstream_name:
                raw = replace_model(raw, boundary, name, upstream_name.encode())
        else:
            text, payload = _json_model(raw)
            model = resolve(text)
            upstream_name = config.models[model].use_model_name
            if upstream_name:
                raw = json.dumps({**payload, "model": upstream_name}).encode()
        return await send(model, request, request.url.path, raw)

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
            path = request.url.path
            known = path in MODEL_ROUTES or path in fixed or path.startswith(("/unload/", "/logs/"))
            status, code = (405, "method_not_allowed") if known else (404, "not_found")
            raise RequestError(status, f"no route {request.method} {request.url.path}", code)
        return await pass_on(resolve(name), request, request.url.path)

    async def pass_on(model: str, request: Request, path: str) -> Response:
        """Forward a request untouched; its path as the client spelled it (quoted again)."""
        raw = await read_body(request, config.max_request_bytes)
        return await send(model, request, quote(path, safe=_PATH_SAFE), raw)

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
        """Stop one model or all once their requests finish, or after `?timeout=SECONDS`."""
        name = request.path_params.get("model")
        timeout = _seconds(request.query_params.get("timeout"), "timeout")
        return JSONResponse({"unloaded": await swapper.unload(resolve(name) if name else None, timeout)})

    async def not_found(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 404)
        message = f"no route {request.method} {request.url.path}"
        kind = "method_not_allowed" if status == 405 else "not_found"
        return JSONResponse(error_body(message, "invalid_request_error", kind), status)

    async def gone(request: Request, error: Exception) -> Response:
        """The client left (mid-body, or before its answer): one line, and nothing to send."""
        model = error.model if isinstance(error, ClientGone) else None
        log.info(
            "%s %s: the client went away%s", request.method, request.url.path, f" ({model})" * bool(model)
        )
        if model is not None:
            swapper.metrics.requests.labels(model, "499").inc()
        return Response(status_code=499)

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
        Route("/unload", unload, methods=["POST"]),  # never GET: a link or an <img> must not stop models
        Route("/unload/{model:path}", unload, methods=["POST"]),
        Route("/upstream/{rest:path}", upstream, methods=any_method),
        Route("/{path:path}", by_query, methods=any_method),
    ]
    guard = Middleware(
        Guard,
        listen_host=config.listen.rpartition(":")[0] if listen_host is None else listen_host,
        allowed_hosts=config.allowed_hosts,
        cors=config.cors,
        api_keys=config.api_keys,
    )
    return Starlette(
        routes=routes,
        middleware=[guard],
        lifespan=lifespan,
        exception_handlers={
            404: not_found,
            405: not_found,
            ClientGone: gone,
            ClientDisconnect: gone,
            SwapctlError: failed,
            Exception: failed,
        },
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
