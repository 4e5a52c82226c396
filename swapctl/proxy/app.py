"""The proxy app: it only assembles. Forwarding, swapctl's own routes, the guard and the
error answers live in their own modules; the objects they share are built by the caller."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from swapctl.config import Config
from swapctl.lifecycle import Fleet, Reload, Swapper
from swapctl.metrics import Metrics
from swapctl.proxy import admin, ui
from swapctl.proxy.forwarding import MODEL_ROUTES, Forwarder
from swapctl.proxy.guard import Guard
from swapctl.proxy.upstream import Upstream
from swapctl.proxy.websocket import Sockets
from swapctl.remote import Places, Watch

log = logging.getLogger("swapctl")
ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]


def build_app(
    config: Config,
    swapper: Swapper,
    upstream: Upstream,
    metrics: Metrics,
    *,
    check_interval: float = 1.0,
    stop_on_exit: bool = False,
    preload: bool = True,
    listen_host: str | None = None,
    reload: Reload | None = None,
    tick: float = 1.0,
    elsewhere: Upstream | None = None,
    watch: Watch | None = None,
    fleet: Fleet | None = None,
) -> ASGIApp:
    """`upstream` reaches the models' servers (its owner closes it); `listen_host` (default:
    the config's `listen`) is the name the Host check accepts besides loopback names, IP
    addresses and `allowedHosts`; `reload` reads the config file again for POST /reload;
    `tick` is the seconds between notes of progress to a streamed request that waits;
    `elsewhere` reaches peers and `proxy:` models' servers (default: `upstream`), `watch`
    probes the peers (default: one with a client of its own).
    Routes read the config through `swapper.config`, which a reload replaces."""
    recent = admin.RecentLines()
    fleet = fleet or Fleet.alone(swapper)  # `swapper` is its local one
    watch = watch or Watch(lambda: fleet.config.peers, None)
    places = Places(fleet, watch)
    forwarder = Forwarder(
        swapper,
        upstream,
        metrics,
        known=admin.PATHS,
        prefixes=admin.PREFIXES,
        tick=tick,
        places=places,
        elsewhere=elsewhere,
    )
    own = admin.Admin(swapper, metrics, recent, forwarder.resolve, reload, places)
    routes: list[BaseRoute] = [
        Route(path, forwarder.model_request, methods=["POST"]) for path in MODEL_ROUTES
    ]
    routes += own.routes()
    routes += forwarder.requests.routes()  # GET /requests, GET /requests/<id>, POST .../cancel
    routes += ui.routes()
    routes += [
        Route("/upstream/{rest:path}", forwarder.upstream, methods=ANY_METHOD),
        Route("/{path:path}", forwarder.by_query, methods=ANY_METHOD),
    ]
    routes += Sockets(forwarder).routes()  # WebSockets on the same paths as the two above
    duties = Duties(places, recent, check_interval, preload=preload, stop_on_exit=stop_on_exit)
    rest = Starlette(routes=routes, lifespan=duties.lifespan, exception_handlers=forwarder.handlers)
    return Guard(
        ModelRoutes(forwarder, rest),
        listen_host=config.listen.rpartition(":")[0] if listen_host is None else listen_host,
        allowed_hosts=config.allowed_hosts,
        cors=config.cors,
        api_keys=config.api_keys,
    )


class ModelRoutes:
    """The hot path's shortcut: a POST to a model route goes straight to the forwarder, past
    Starlette's middleware stack, router and request objects; everything else (lifespan
    included) to the Starlette app, which also answers a model route's other methods."""

    def __init__(self, forwarder: Forwarder, rest: ASGIApp) -> None:
        self.forwarder, self.rest = forwarder, rest
        self.paths = frozenset(MODEL_ROUTES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            await self.forwarder.serve(scope, receive, send)
        else:
            await self.rest(scope, receive, send)


class Duties:
    """What runs beside the routes while the app serves: each host's swapper's upkeep and
    preload, the peers' watch, the other hosts' events relayed, the log lines kept for
    /logs; and, on the way out, the models stopped if asked."""

    def __init__(
        self,
        places: Places,
        recent: admin.RecentLines,
        interval: float,
        *,
        preload: bool,
        stop_on_exit: bool,
    ) -> None:
        self.places, self.recent, self.interval = places, recent, interval
        self.swappers = list(places.fleet.swappers.values())
        self.preload, self.stop_on_exit = preload, stop_on_exit

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        log.addHandler(self.recent)
        tasks = [asyncio.create_task(swapper.upkeep(self.interval)) for swapper in self.swappers]
        tasks += [
            asyncio.create_task(self.places.watch.run()),
            asyncio.create_task(self.places.relay()),
            asyncio.create_task(self.places.fleet.watch_engines()),
        ]
        if self.preload:
            tasks += [asyncio.create_task(swapper.preload()) for swapper in self.swappers]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await self.places.watch.aclose()
            if self.stop_on_exit:
                await asyncio.gather(*(swapper.unload() for swapper in self.swappers))
            log.removeHandler(self.recent)
