"""The OpenAI-compatible proxy: a Starlette app that finds the model a request names, has
the swapper make it ready, and streams the request through. Errors become OpenAI error
JSON in one place, `error_response`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from swapctl.errors import BackendError, StartError, SwapctlError, UnknownModelError
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
    if isinstance(error, StartError):
        return JSONResponse(error_body(str(error), "server_error", "model_start_failed"), 502)
    if isinstance(error, BackendError):
        return JSONResponse(error_body(str(error), "server_error", "backend_error"), 503)
    log.exception("unexpected error", exc_info=error)
    return JSONResponse(error_body(f"internal error: {error}", "server_error", "internal_error"), 500)


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


class Forwarded(StreamingResponse):
    """A streamed upstream response that always closes upstream and ends its lease,
    whether the stream ends, fails, or the client goes away first."""

    def __init__(self, upstream: httpx.Response, swapper: Swapper, slot: Slot) -> None:
        self.upstream, self.swapper, self.slot = upstream, swapper, slot
        headers = _headers(upstream.headers)
        if "content-length" in upstream.headers:
            headers["content-length"] = upstream.headers["content-length"]
        super().__init__(self._chunks(), status_code=upstream.status_code, headers=headers)

    async def _chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_raw():
                yield chunk
        except httpx.TransportError as error:
            log.warning("%s: upstream broke off mid-response: %s", self.slot.model, error)
            await self.swapper.confirm_alive(self.slot)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()
            await self.swapper.release(self.slot)


def _request_model(body: bytes) -> tuple[str, dict[str, Any]]:
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


def build_app(swapper: Swapper, check_interval: float = 1.0, stop_on_exit: bool = False) -> Starlette:
    config = swapper.config
    client = swapper.client
    created = int(time.time())

    async def forward(request: Request) -> Response:
        body = await request.body()
        name, payload = _request_model(body)
        model = config.resolve(name)
        if model is None:
            raise UnknownModelError(name)
        upstream_name = config.models[model].use_model_name
        if upstream_name:
            body = json.dumps({**payload, "model": upstream_name}).encode()
        slot = await swapper.acquire(model)
        try:
            assert slot.container is not None
            url = slot.container.url + request.url.path
            upstream = await client.send(
                client.build_request(
                    request.method,
                    url,
                    params=request.query_params,
                    headers=_headers(request.headers),
                    content=body,
                ),
                stream=True,
            )
        except BaseException as error:
            await swapper.release(slot)
            if isinstance(error, httpx.TransportError):
                await swapper.confirm_alive(slot)
                raise BackendError(f"the model's server did not answer: {error!r}", model) from None
            raise
        return Forwarded(upstream, swapper, slot)

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
        model = config.resolve(name) if name else None
        if name and model is None:
            raise UnknownModelError(name)
        return JSONResponse({"unloaded": await swapper.unload(model)})

    async def not_found(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 404)
        message = f"no route {request.method} {request.url.path}"
        kind = "method_not_allowed" if status == 405 else "not_found"
        return JSONResponse(error_body(message, "invalid_request_error", kind), status)

    async def failed(request: Request, error: Exception) -> Response:
        return error_response(error)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        watcher = asyncio.create_task(_watch(swapper, check_interval))
        try:
            yield
        finally:
            watcher.cancel()
            if stop_on_exit:
                await swapper.unload()
            await client.aclose()

    openai_routes = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    routes = [Route(path, forward, methods=["POST"]) for path in openai_routes]
    routes += [
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/running", running, methods=["GET"]),
        Route("/unload", unload, methods=["GET", "POST"]),
        Route("/unload/{model:path}", unload, methods=["GET", "POST"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={404: not_found, 405: not_found, SwapctlError: failed},
    )


async def _watch(swapper: Swapper, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await swapper.check()
        except SwapctlError as error:
            log.warning("checking containers: %s", error)
