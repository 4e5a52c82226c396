"""Errors into HTTP answers, in one place: a table from error type to status and OpenAI
error JSON, and the app's exception handlers.

Anthropic's routes (`/v1/messages...`) answer in Anthropic's shape instead, so that its SDKs
raise their own exceptions: `anthropic(status, body)` turns the one into the other, and
`error_event` does the same for an event stream that breaks after its head.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from swapctl.errors import (
    BackendError,
    Busy,
    ElsewhereUnavailable,
    Loop,
    RequestError,
    ShuttingDown,
    StartError,
    SwapctlError,
    UnknownModelError,
    UpstreamTimeout,
)
from swapctl.metrics import Metrics

log = logging.getLogger("swapctl")

# error type -> (HTTP status, OpenAI error type, OpenAI error code); the first match in the
# error's class hierarchy wins, so a subclass of BackendError is a 503 like its parent
ANSWERS: Mapping[type[SwapctlError], tuple[int, str, str]] = {
    UnknownModelError: (404, "invalid_request_error", "model_not_found"),
    Busy: (429, "rate_limit_error", "model_busy"),
    StartError: (502, "server_error", "model_start_failed"),
    BackendError: (503, "server_error", "backend_error"),
    UpstreamTimeout: (504, "server_error", "upstream_timeout"),
    ElsewhereUnavailable: (502, "server_error", "upstream_unavailable"),
    Loop: (508, "invalid_request_error", "loop_detected"),
    ShuttingDown: (503, "server_error", "shutting_down"),
}
RETRY_AFTER = {429: {"retry-after": "1"}}
ANTHROPIC_ROUTE = "/v1/messages"  # and the paths below it
# HTTP status -> Anthropic's error type (https://docs.claude.com/en/api/errors)
ANTHROPIC_TYPES = {
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class ClientGone(Exception):
    """The client went away before its answer was ready."""

    def __init__(self, model: str | None = None) -> None:
        super().__init__(model)
        self.model = model


def shutting_down(model: str) -> ShuttingDown | None:
    """For a CancelledError in a request's task: ShuttingDown if the server cancelled the task
    (it does so only once its shutdown's grace is over), the cancellation taken back so that
    the request can still be answered; None for any other CancelledError, to raise again."""
    task = asyncio.current_task()
    if task is None or task.cancelling() == 0:
        return None
    task.uncancel()
    return ShuttingDown(model)


def error_body(message: str, kind: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_answer(error: Exception) -> tuple[int, dict[str, Any]]:
    """The HTTP status and OpenAI error JSON of an error: a response's, or an event's once a
    stream has begun."""
    if isinstance(error, RequestError):
        return error.status, error_body(str(error), "invalid_request_error", error.code)
    found = next((ANSWERS[k] for k in type(error).__mro__ if k in ANSWERS), None)
    if found is None:
        log.error("unexpected error: %r", error, exc_info=error)
        return 500, error_body(f"internal error: {error!r}", "server_error", "internal_error")
    status, kind, code = found
    return status, error_body(str(error), kind, code)


def speaks_anthropic(path: str) -> bool:
    """Whether a route's clients are Anthropic's: its errors are theirs in shape."""
    return path.startswith(ANTHROPIC_ROUTE) and path[len(ANTHROPIC_ROUTE) : len(ANTHROPIC_ROUTE) + 1] in (
        "",
        "/",
    )


def anthropic(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI error body (`error_body`) in Anthropic's shape, for the same HTTP status."""
    kind = ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}


def in_dialect(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An error body as the clients of the route at `path` read it."""
    return anthropic(status, body) if speaks_anthropic(path) else body


def error_event(path: str, status: int, body: dict[str, Any]) -> bytes:
    """The event that ends a stream broken after its head: OpenAI's clients raise on a `data:`
    event holding an error; Anthropic's on an `event: error`."""
    if speaks_anthropic(path):
        return f"event: error\ndata: {json.dumps(anthropic(status, body))}\n\n".encode()
    return f"data: {json.dumps(body)}\n\n".encode()


def error_json(
    path: str, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error answer (`error_body`) in the shape the route's clients read."""
    return JSONResponse(in_dialect(path, status, body), status, headers=headers)


def error_response(error: Exception, path: str = "") -> JSONResponse:
    status, body = error_answer(error)
    return error_json(path, status, body, RETRY_AFTER.get(status))


Handler = Callable[[Request, Exception], Any]


def handlers(metrics: Metrics, models: Collection[str]) -> dict[Any, Handler]:
    """The app's exception handlers: routing misses, clients gone, and every other error."""

    def count(model: object, status: int) -> None:
        if isinstance(model, str) and model in models:
            metrics.requests.labels(model, str(status)).inc()

    async def not_found(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 404)
        message = f"no route {request.method} {request.url.path}"
        kind = "method_not_allowed" if status == 405 else "not_found"
        return error_json(request.url.path, status, error_body(message, "invalid_request_error", kind))

    async def gone(request: Request, error: Exception) -> Response:
        """The client left (mid-body, or before its answer): one line, and nothing to send."""
        model = error.model if isinstance(error, ClientGone) else None
        named = f" ({model})" if model else ""
        log.info("%s %s: the client went away%s", request.method, request.url.path, named)
        count(model, 499)
        return Response(status_code=499)

    async def failed(request: Request, error: Exception) -> Response:
        response = error_response(error, request.url.path)
        count(getattr(error, "model", None), response.status_code)
        return response

    return {
        404: not_found,
        405: not_found,
        ClientGone: gone,
        ClientDisconnect: gone,
        SwapctlError: failed,
        Exception: failed,
    }
