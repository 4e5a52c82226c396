"""`swapctl up`'s server, assembled: the swapper that adopts what runs, the GPU watch, the
app, uvicorn, and the config reloads (SIGHUP, POST /reload, a change of the file).

Only `up` imports this module: it loads uvicorn, Starlette, httpx and the proxy, which the
other commands must not pay for. The command keeps what is its own (the config read, the
instance's lock, the exit codes); everything built to serve is built here.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp

from swapctl.backend import Backend
from swapctl.config import Config
from swapctl.config.hosts import LOCAL_NAME
from swapctl.config.scalars import is_loopback
from swapctl.errors import BackendError
from swapctl.gpus import Inventory, NoGpu, Snapshot, mismatches, read_attributed
from swapctl.lifecycle import Fleet, Reloader, Swapper
from swapctl.lifecycle.history import BUCKET, History
from swapctl.measures import MeasureStore
from swapctl.metrics import Metrics
from swapctl.proxy import build_app
from swapctl.proxy.http1 import Http1Upstream
from swapctl.proxy.transport import AiohttpTransport, no_cookies
from swapctl.proxy.upstream import ByScheme, HttpxUpstream
from swapctl.remote import Watch

log = logging.getLogger("swapctl")

KEEP_ALIVE = 75  # seconds an idle client connection is kept open (nginx's default)


def start_logging(loaded: Config, host: str) -> None:
    """Log lines with the time on stderr, and the config's warnings first among them; one
    more where the proxy listens beyond this machine with no API key."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    for warning in loaded.warnings:
        log.warning("warning: %s", warning)
    if not loaded.api_keys and not is_loopback(host):
        log.warning(
            "warning: listening on %s with no apiKeys: anyone on the network can use and stop your "
            "models; set apiKeys in the config",
            host,
        )


def run(serving: Coroutine[Any, Any, None]) -> None:
    """Run `serve`'s coroutine to its end, on uvloop where it is installed (a faster loop)."""
    try:
        import uvloop

        uvloop.run(serving)
    except ImportError:
        asyncio.run(serving)


async def serve(
    loaded: Config,
    backend: Backend,
    host: str,
    port: int,
    path: Path,
    *,
    stop_on_exit: bool,
    verbose: bool,
    watch: bool,
    inventory: Inventory | None = None,
    measures: MeasureStore | None = None,
) -> None:
    """Adopt what runs, then serve until interrupted; the objects the app shares are built
    here. SIGHUP, POST /reload and, with `watch`, a change of the file reload `path`.
    Where `inventory` finds a GPU, /metrics reports its memory per device and per model, and
    the swapper measures each model's footprint and sees evicted models' memory come back."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(64, "swapctl"))
    timeout = httpx.Timeout(None, connect=10.0)
    metrics = Metrics()
    gpus = (
        None
        if inventory is None
        else await watch_gpus(metrics, inventory, backend, loaded.instance, loaded.gpu_memory)
    )
    upstream = Http1Upstream()  # forwarding: kept-alive connections, httptools' parser
    async with (
        httpx.AsyncClient(  # health checks
            timeout=timeout, transport=AiohttpTransport(), cookies=no_cookies()
        ) as client,
        httpx.AsyncClient(timeout=timeout, cookies=no_cookies()) as elsewhere,  # peers, proxy: models (https)
    ):
        here = loaded.on(LOCAL_NAME)
        swapper = Swapper(here, backend, client, metrics=metrics, inventory=gpus, measures=measures)
        fleet = Fleet(loaded, {LOCAL_NAME: swapper, **hosts_swappers(loaded, client, measures)})
        adopted = []
        for name, each in fleet.swappers.items():
            try:
                found = await each.adopt()
            except BackendError as error:
                if name == LOCAL_NAME:
                    raise
                log.warning("host '%s': %s: its models answer 503 until its engine answers", name, error)
                fleet.down[name] = str(error)
                continue
            adopted += found if name == LOCAL_NAME else [f"{model}@{name}" for model in found]
            if name != LOCAL_NAME:
                log.info(
                    "host '%s': %d models, %s", name, len(each.config.models), each.config.policy.summary()
                )
        log.info(
            "swapctl %s: %d models, %s; adopted %s; listening on http://%s:%d",
            loaded.instance,
            len(here.models),
            here.policy.summary(),
            ", ".join(adopted) or "nothing",
            host,
            port,
        )
        reloader = Reloader(path, fleet)
        app = build_app(
            loaded,
            swapper,
            upstream,
            metrics,
            stop_on_exit=stop_on_exit,
            listen_host=host,
            reload=reloader.reload,
            elsewhere=ByScheme(upstream, HttpxUpstream(elsewhere)),
            watch=Watch(lambda: fleet.config.peers, elsewhere),
            fleet=fleet,
        )
        sampling = (
            None
            if gpus is None
            else asyncio.create_task(
                sample_gpus(swapper.activity.last_hour, attributed(gpus, backend, loaded.instance))
            )
        )
        try:
            async with reloader.serving(watch):
                await build_server(app, host, port, verbose, closing=swapper.activity.close).serve()
        finally:
            if sampling is not None:
                sampling.cancel()
            await upstream.aclose()
            await swapper.measures.flush()


def hosts_swappers(
    loaded: Config, client: httpx.AsyncClient, measures: MeasureStore | None
) -> dict[str, Swapper]:
    """A swapper for each other host some model runs on, over its own engine; their metrics
    are their own (this machine's are /metrics')."""
    from swapctl.backend.docker import DockerBackend

    return {
        name: Swapper(loaded.on(name), DockerBackend(loaded.hosts[name]), client, measures=measures)
        for name in loaded.host_names
        if name != LOCAL_NAME
    }


async def watch_gpus(
    metrics: Metrics,
    inventory: Inventory,
    backend: Backend,
    instance: str,
    declared: tuple[int, ...] | None = None,
) -> Inventory | None:
    """GPU gauges in /metrics, where the inventory finds a GPU now (else one log line why);
    the inventory where it does, for the swapper to measure footprints and verify evictions.
    The `declared` GPUs (`hardware.gpus`) are checked against it: a warning per mismatch."""

    found = await asyncio.to_thread(inventory.read)
    if isinstance(found, NoGpu):
        log.info("no GPU memory in /metrics: %s", found.reason)
        return None
    for mismatch in mismatches(declared, found) if declared is not None else ():
        log.warning("%s%s", "note: " * mismatch.note, mismatch.line)
    metrics.watch_gpus(attributed(inventory, backend, instance))
    return inventory


def attributed(inventory: Inventory, backend: Backend, instance: str) -> Callable[[], Snapshot | NoGpu]:
    """A read of the GPUs whose processes name the models whose containers run them."""
    return lambda: read_attributed(inventory, lambda: backend.list(instance))


async def sample_gpus(history: History, read: Callable[[], Snapshot | NoGpu], every: float = BUCKET) -> None:
    """A sample of the GPUs into `history` every `every` seconds, read in a thread, for the
    page's charts; a read that fails is skipped (the log says why once, until one succeeds)."""
    failing = False
    while True:
        try:
            found = await asyncio.to_thread(read)
        except Exception as error:  # the engine, or the driver, did not answer this time
            if not failing:
                log.warning("GPU memory for the page's charts not sampled: %s", error)
            failing = True
        else:
            failing = False
            if isinstance(found, Snapshot):
                history.gpu(found)
        await asyncio.sleep(every)


class Server(uvicorn.Server):
    """uvicorn's server, which calls `closing` as it begins to shut down, before it waits for
    the connections: event and log streams never end on their own, so it ends them."""

    def __init__(self, config: uvicorn.Config, closing: Callable[[], None]) -> None:
        super().__init__(config)
        self.closing = closing

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.closing()
        await super().shutdown(sockets)


def build_server(
    app: ASGIApp, host: str, port: int, verbose: bool, closing: Callable[[], None] = lambda: None
) -> Server:
    """The HTTP server for `app` on host:port; `verbose` logs every request."""
    server_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="info" if verbose else "warning",
        access_log=verbose,
        timeout_graceful_shutdown=10,  # on Ctrl-C, requests in flight get 10 s to finish
        proxy_headers=False,  # X-Forwarded-* from clients are passed on, never trusted
        server_header=False,
        # an idle client connection is closed by the client first: HTTP clients drop theirs
        # after a few seconds (httpx, so the OpenAI SDKs: 5 s), and one that reuses a connection
        # just as the server closes it gets no answer (uvicorn's own default is 5 s as well)
        timeout_keep_alive=KEEP_ALIVE,
    )
    return Server(server_config, closing)
