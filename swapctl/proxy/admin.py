"""swapctl's own routes: the model list, health, what runs, unload, reload, metrics and logs.

They read the config through the swapper, whose `config` a reload replaces."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from swapctl.errors import ConfigError, RequestError
from swapctl.lifecycle import Reload, Swapper
from swapctl.metrics import Metrics
from swapctl.proxy.errors import error_body

# paths answered here (a request to one with another method is a 405, not a 404)
PATHS = ("/v1/models", "/health", "/running", "/unload", "/reload", "/metrics", "/logs")
PREFIXES = ("/unload/", "/logs/")


class RecentLines(logging.Handler):
    """The last lines logged, for GET /logs."""

    def __init__(self, keep: int = 1000) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


class Admin:
    """`reload` reads the config file again and applies it (None: the app has no file)."""

    def __init__(
        self,
        swapper: Swapper,
        metrics: Metrics,
        recent: RecentLines,
        resolve: Callable[[str], str],
        reload: Reload | None = None,
    ) -> None:
        self.swapper, self.metrics, self.recent = swapper, metrics, recent
        self.resolve, self.reload_file = resolve, reload
        self.created = int(time.time())

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/running", self.running, methods=["GET"]),
            Route("/metrics", self.render_metrics, methods=["GET"]),
            Route("/logs", self.logs, methods=["GET"]),
            Route("/logs/{model:path}", self.logs, methods=["GET"]),
            # never GET: a link or an <img> must not stop models
            Route("/unload", self.unload, methods=["POST"]),
            Route("/unload/{model:path}", self.unload, methods=["POST"]),
            Route("/reload", self.reload, methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        data = [
            {
                "id": m,
                "object": "model",
                "created": self.created,
                "owned_by": "swapctl",
                "aliases": list(c.aliases),
            }
            for m, c in self.swapper.config.models.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        return PlainTextResponse("OK")

    async def running(self, request: Request) -> Response:
        statuses = [s.to_json() for s in self.swapper.status()]
        return JSONResponse({"running": [s for s in statuses if s["state"] != "stopped"], "models": statuses})

    async def unload(self, request: Request) -> Response:
        """Stop one model or all once their requests finish, or after `?timeout=SECONDS`."""
        name = request.path_params.get("model")
        timeout = seconds(request.query_params.get("timeout"), "timeout")
        unloaded = await self.swapper.unload(self.resolve(name) if name else None, timeout)
        return JSONResponse({"unloaded": unloaded})

    async def reload(self, request: Request) -> Response:
        """Read the config file again and apply it: what changed, or a 400 naming the key path
        of the error (the old config keeps serving)."""
        if self.reload_file is None:
            raise RequestError(404, "this proxy was not started from a config file", "not_found")
        try:
            changes = await self.reload_file("POST /reload")
        except ConfigError as error:
            message = f"the new config was refused, the old one keeps serving: {error}"
            body = error_body(message, "invalid_request_error", "invalid_config")
            body["error"]["param"] = error.path
            return JSONResponse(body, 400)
        return JSONResponse(changes.to_json())

    async def render_metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def logs(self, request: Request) -> Response:
        """The proxy's recent log lines; `/logs/<model>`: the model container's last lines."""
        name = request.path_params.get("model")
        if not name:
            return PlainTextResponse("\n".join(self.recent.lines) + "\n")
        return PlainTextResponse(await self.swapper.logs(self.resolve(name), 200))


def seconds(text: str | None, name: str) -> float | None:
    """A query parameter of seconds, 0 to an hour; None when absent."""
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
