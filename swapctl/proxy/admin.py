"""swapctl's own routes: health, version, what runs, unload, reload, metrics and logs (the model list
and llama.cpp's router API are `catalog`'s); and the live ones: events (Server-Sent Events,
see `swapctl.lifecycle.activity`), log streams, a plan preview and load; and the last hour
for the page's charts (`swapctl.lifecycle.history`).

They read the config through the swapper, whose `config` a reload replaces. The streams
never end on their own: each ends when its client leaves or the proxy shuts down
(`Activity.close`)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

import swapctl
from swapctl.errors import ConfigError, RequestError
from swapctl.lifecycle import Event, Fleet, Reload, Subscription, Swapper
from swapctl.metrics import Metrics
from swapctl.proxy import catalog
from swapctl.proxy.errors import error_body
from swapctl.remote import Places

log = logging.getLogger("swapctl")
# paths answered here (a request to one with another method is a 405, not a 404)
PATHS = (
    "/health",
    "/version",
    "/running",
    "/unload",
    "/reload",
    "/metrics",
    "/logs",
    "/events",
    "/history",
    "/ui",
    "/requests",
    *catalog.PATHS,
)
PREFIXES = ("/unload/", "/logs/", "/plan/", "/load/", "/metrics/", "/requests/", *catalog.PREFIXES)
KEEP_ALIVE = 15.0  # seconds between the comments that keep an event stream's proxies patient
SNAPSHOT_LINES = 100  # the proxy's log lines in a snapshot
STREAMING = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # nginx must not hold them


class RecentLines(logging.Handler):
    """The last lines logged, for GET /logs; each also goes to `tell` when set (the
    activity's `log` events)."""

    def __init__(self, keep: int = 1000) -> None:
        super().__init__()
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        self.tell: Callable[[str], None] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        self.lines.append(line)
        if self.tell is not None:
            self.tell(line)


class Admin:
    """`reload` reads the config file again and applies it (None: the app has no file)."""

    def __init__(
        self,
        swapper: Swapper,
        metrics: Metrics,
        recent: RecentLines,
        resolve: Callable[[str], str],
        reload: Reload | None = None,
        places: Places | None = None,
    ) -> None:
        self.swapper, self.metrics, self.recent = swapper, metrics, recent
        self.resolve, self.reload_file = resolve, reload
        self.created = int(time.time())
        self.catalog = catalog.Catalog(swapper, resolve, self.created, places)
        self.places = places
        self.fleet = places.fleet if places is not None else Fleet.alone(swapper)
        recent.tell = swapper.activity.logged

    def routes(self) -> list[Route]:
        return [
            *self.catalog.routes(),
            Route("/health", self.health, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/running", self.running, methods=["GET"]),
            Route("/metrics", self.render_metrics, methods=["GET"]),
            Route("/metrics/{host}", self.render_metrics, methods=["GET"]),
            Route("/events", self.events, methods=["GET"]),
            Route("/history", self.history, methods=["GET"]),
            Route("/logs", self.logs, methods=["GET"]),
            Route("/logs/stream", self.log_stream, methods=["GET"]),
            Route("/logs/{model:path}/stream", self.model_log_stream, methods=["GET"]),
            Route("/logs/{model:path}", self.logs, methods=["GET"]),
            Route("/plan/{model:path}", self.plan, methods=["GET"]),
            # never GET: a link or an <img> must not start or stop models
            Route("/load/{model:path}", self.load, methods=["POST"]),
            Route("/unload", self.unload, methods=["POST"]),
            Route("/unload/{model:path}", self.unload, methods=["POST"]),
            Route("/reload", self.reload, methods=["POST"]),
        ]

    async def health(self, request: Request) -> Response:
        """OK; or, for a while after the watchdog repaired a model, `degraded` and why (still
        200: the proxy serves)."""
        degraded = self.swapper.degraded()
        return PlainTextResponse("degraded: " + "; ".join(degraded) if degraded else "OK")

    async def version(self, request: Request) -> Response:
        """The swapctl serving: `{"version": "0.1.0"}`."""
        return JSONResponse({"version": swapctl.__version__})

    async def running(self, request: Request) -> Response:
        statuses = [s.to_json() for s in self.swapper.status()]
        statuses += self.places.rows() if self.places is not None else []
        idle = ("stopped", "sleeping")  # a sleeping model's container runs, but it holds no GPU
        return JSONResponse({"running": [s for s in statuses if s["state"] not in idle], "models": statuses})

    async def unload(self, request: Request) -> Response:
        """Stop one model or all once their requests finish, or after `?timeout=SECONDS`."""
        name = request.path_params.get("model")
        timeout = seconds(request.query_params.get("timeout"), "timeout")
        unloaded = await self.fleet.unload(self.resolve(name) if name else None, timeout)
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
        """This machine's metrics; `/metrics/<host>`: another host's swapper's, the same names
        (a scrape job per host, its `host` label set by the job)."""
        host = request.path_params.get("host")
        if host is None:
            return Response(await self.metrics.scrape(), media_type="text/plain; version=0.0.4")
        swapper = self.fleet.swappers.get(host)
        if swapper is None:
            raise RequestError(
                404, f"no host '{host}' runs models here ({', '.join(self.fleet.swappers)})", "not_found"
            )
        return Response(await swapper.metrics.scrape(), media_type="text/plain; version=0.0.4")

    async def logs(self, request: Request) -> Response:
        """The proxy's recent log lines; `/logs/<model>`: the model container's last lines."""
        name = request.path_params.get("model")
        if not name:
            return PlainTextResponse("\n".join(self.recent.lines) + "\n")
        model = self.resolve(name)
        return PlainTextResponse(await self.fleet.of(model).logs(model, 200))

    # --- live ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        """Where an event stream starts from: every model's row, the last swaps, log lines."""
        lines = list(self.recent.lines)[-SNAPSHOT_LINES:]
        rows = self.swapper.rows() + (self.places.rows() if self.places is not None else [])
        history = self.swapper.activity.history()
        return {"models": rows, "swaps": history, "logs": lines, "version": swapctl.__version__}

    async def history(self, request: Request) -> Response:
        """The last hour for the page's charts (see `swapctl.lifecycle.history`): this
        machine's requests and GPUs, and every host's models' states."""
        found = self.swapper.activity.last_hour.to_json()
        for swapper in self.fleet.swappers.values():
            if swapper is not self.swapper:
                found["states"] += swapper.activity.last_hour.states_json()
        found["states"].sort(key=lambda interval: interval["from"])
        return JSONResponse(found)

    async def events(self, request: Request) -> Response:
        """Server-Sent Events: a snapshot, then every change (see swapctl.lifecycle.activity)."""
        return StreamingResponse(self._events(), media_type="text/event-stream", headers=STREAMING)

    async def _events(self) -> AsyncIterator[bytes]:
        with self.swapper.activity.subscribe() as subscription:
            yield Event("snapshot", self.snapshot()).frame  # no await since subscribing: nothing missed
            async for frame in sse_frames(subscription, KEEP_ALIVE):
                yield frame
        if subscription.dropped:
            log.warning("GET /events: a client fell %d events behind; its stream ended", subscription.backlog)

    async def log_stream(self, request: Request) -> Response:
        """The proxy's log as plain text: its recent lines, then each new one."""
        return StreamingResponse(self._log_lines(), media_type="text/plain; charset=utf-8", headers=STREAMING)

    async def _log_lines(self) -> AsyncIterator[bytes]:
        with self.swapper.activity.subscribe({"log"}) as subscription:
            if self.recent.lines:
                yield "".join(f"{line}\n" for line in self.recent.lines).encode()
            async for event in subscription:
                yield f"{event.data['line']}\n".encode()

    async def model_log_stream(self, request: Request) -> Response:
        """A model container's log as plain text, followed until the container stops; 409
        when the model has no container."""
        model = self.resolve(request.path_params["model"])
        swapper = self.fleet.of(model)
        container = swapper.container(model)
        if container is None:
            message = f"model '{model}' is not running: it has no container log to follow"
            raise RequestError(409, message, "model_not_running")
        return StreamingResponse(
            self._followed(swapper, container.id), media_type="text/plain; charset=utf-8", headers=STREAMING
        )

    async def _followed(self, swapper: Swapper, container_id: str) -> AsyncIterator[bytes]:
        following = swapper.backend.follow(container_id)
        try:
            with self.swapper.activity.until_closed(following.close):
                async for line in following:
                    yield f"{line}\n".encode()
        finally:
            following.close()  # the client left: the engine's stream closes, its thread ends

    async def plan(self, request: Request) -> Response:
        """What a request for the model would do now, changing nothing."""
        model = self.resolve(request.path_params["model"])
        decision = self.fleet.of(model).plan(model)
        return JSONResponse(
            {
                "model": decision.model,
                "running": decision.already_running,
                "set": decision.set,
                "evict": list(decision.evict),
                "cost": decision.cost,
            }
        )

    async def load(self, request: Request) -> Response:
        """Start the model as a request would; its row once it is ready."""
        model = self.resolve(request.path_params["model"])
        swapper = await self.catalog.host_for(model, request)
        async with await swapper.acquire(model):
            pass
        return JSONResponse(swapper.row(model))


async def sse_frames(subscription: Subscription, keep_alive: float) -> AsyncIterator[bytes]:
    """A subscription's events as Server-Sent Events, and a comment every `keep_alive`
    seconds whatever else is sent; until the subscription ends. Events that came together
    go out together, in one chunk: under load (a `request` event per request) a write per
    event would cost the proxy, and the page that reads them, more than the events."""
    loop = asyncio.get_running_loop()
    due = loop.time() + keep_alive
    while True:
        if loop.time() >= due:
            due = loop.time() + keep_alive
            yield b": keep-alive\n\n"
        try:
            async with asyncio.timeout_at(due):
                event = await anext(subscription)
        except TimeoutError:
            continue
        except StopAsyncIteration:
            return
        more = subscription.take_queued()
        yield b"".join([event.frame, *(e.frame for e in more)]) if more else event.frame


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
