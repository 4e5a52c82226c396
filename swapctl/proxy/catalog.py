"""The model list, one model's entry, and llama.cpp's router API: what clients ask about the
models rather than of them.

    GET  /v1/models, /models    {"object": "list", "data": [ENTRY...]}: every model not
                                `unlisted`, each followed by its aliases (with
                                `includeAliasesInList`) and its variants (the IDs of its
                                `filters.setParamsByID`), each an ENTRY of its own
    GET  /v1/models/<id>        ENTRY: a model ID, alias or variant (unlisted ones too); the
                                id may hold '/'; 404 model_not_found for any other
    POST /models/load           {"model": id} -> {"success": true} once the model is loaded
    POST /models/unload         {"model": id} -> {"success": true} once it is stopped

    ENTRY = {"id", "object": "model", "created", "owned_by": "swapctl",
             "name", "description" (when set), "aliases": [its model's aliases],
             "status": {"value": STATUS, "failed": true (when its last start failed)},
             "meta": {"llamaswap": {...its metadata}} (when set)}

An alias's or a variant's entry is its model's under its own id. STATUS names a model's
state as llama-server in router mode (`--models-dir`) names its models': `loaded` (ready),
`loading` (pulling its image, starting), `sleeping` (vLLM's sleep: a request wakes it), and
`unloaded` for all else (stopped; leaving or stopping, as its last requests finish; a
container that would not stop, which takes no requests); an unloaded model whose last start
failed has `"failed": true` beside it, as llama-server marks a model whose process exited in
error (its cause is in the log and `/events`). `meta.llamaswap` is where
llama-swap returns a model's metadata, so that tools written for it read swapctl's too.

The router routes answer as llama-server does (its answers recorded against it): a load of a
model already loaded or loading and an unload of a stopped one are 400s; a model unknown is
404 model_not_found (llama-server itself says 400 for an unload). Where llama-server answers
at once and loads or stops behind, swapctl answers when it is done: a load decides and evicts
like a request, and a failed start is a 502 naming its cause; an unload waits for the
requests in flight. `/models` is always this list: `?model=` does not forward it (a model's
own `/models` is at `/upstream/<model>/models`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from swapctl.config import Config
from swapctl.errors import RequestError
from swapctl.lifecycle import Fleet, State, Swapper
from swapctl.proxy.forwarding import json_model, read_body
from swapctl.remote import Here, Places

# swapctl's states by the names llama-server's router gives its models' states
STATUS: Mapping[State, str] = {
    State.READY: "loaded",
    State.PULLING: "loading",
    State.STARTING: "loading",
    State.SLEEPING: "sleeping",
    State.STOPPED: "unloaded",
    State.LEAVING: "unloaded",
    State.STOPPING: "unloaded",
    State.STOP_FAILED: "unloaded",
}
PATHS = ("/v1/models", "/models", "/models/load", "/models/unload")
PREFIXES = ("/v1/models/",)

Entry = dict[str, Any]


def entry(config: Config, listed_as: str, model: str, status: Mapping[str, Any], created: int) -> Entry:
    """The entry of `model` under the id `listed_as` (its ID, an alias or a variant)."""
    found: Entry = {"id": listed_as, "object": "model", "created": created, "owned_by": "swapctl"}
    own = config.routed(model)
    found |= {key: value for key, value in (("name", own.name), ("description", own.description)) if value}
    found["aliases"] = list(own.aliases)
    found["status"] = dict(status)
    if own.metadata:
        found["meta"] = {"llamaswap": dict(own.metadata)}
    return found


def peer_entry(model: str, peer: str, status: Mapping[str, Any], created: int) -> Entry:
    """The entry of a model only peers serve: its ID, its status, the first peer that serves it."""
    return {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "swapctl",
        "aliases": [],
        "status": dict(status),
        "meta": {"llamaswap": {"peer": peer}},
    }


def listed(config: Config) -> Iterator[tuple[str, str]]:
    """(id, model ID) of each entry of the list, in the config's order."""
    variants: dict[str, list[str]] = {}
    for name, model in config.variants.items():
        variants.setdefault(model, []).append(name)
    for model, own in [*config.models.items(), *config.remotes.items()]:
        if own.unlisted:
            continue
        yield model, model
        if config.include_aliases_in_list:
            yield from ((alias, model) for alias in own.aliases)
        yield from ((name, model) for name in variants.get(model, ()))


def catalog(config: Config, statuses: Mapping[str, Mapping[str, Any]], created: int) -> list[Entry]:
    """The list's entries; `statuses`: each model's status object (absent: unloaded)."""
    unloaded = {"value": "unloaded"}
    return [
        entry(config, name, model, statuses.get(model, unloaded), created) for name, model in listed(config)
    ]


class Catalog:
    """The routes. `resolve` turns a name (ID, alias, variant) into a model ID or raises
    UnknownModelError (a 404); `places` knows the models served elsewhere and their state."""

    def __init__(
        self, swapper: Swapper, resolve: Callable[[str], str], created: int, places: Places | None = None
    ) -> None:
        self.swapper, self.created = swapper, created
        self.places = places
        self.fleet = places.fleet if places is not None else Fleet.alone(swapper)
        self.resolve = places.resolve if places is not None else resolve

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/models/load", self.load, methods=["POST"]),
            Route("/models/unload", self.unload, methods=["POST"]),
        ]

    @property
    def config(self) -> Config:
        """The whole config (every host's models)."""
        return self.fleet.config

    def status(self, model: str) -> dict[str, Any]:
        """Its status object: STATUS, and whether its last start failed while it is unloaded;
        for a model served elsewhere (too), the nearest to serving of its places'."""
        if self.places is not None and model not in self.swapper.config.models:
            return self.places.status(model)
        slot = self.swapper.slots.get(model)
        value = STATUS[slot.state] if slot is not None else "unloaded"
        last = next((swap for swap in reversed(self.swapper.activity.swaps) if swap.model == model), None)
        return (
            {"value": value, "failed": True}
            if value == "unloaded" and last and not last.ok
            else {"value": value}
        )

    async def models(self, request: Request) -> Response:
        config = self.config
        statuses = {model: self.status(model) for model in [*config.models, *config.remotes]}
        data = catalog(config, statuses, self.created)
        if self.places is not None:  # the peers' models, each once, after this config's
            seen = {*config.models, *config.remotes}
            for model, place in self.places.offered():
                if model not in seen and place.peer is not None:
                    seen.add(model)
                    data.append(peer_entry(model, place.peer.name, self.status(model), self.created))
        return JSONResponse({"object": "list", "data": data})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        model = self.resolve(name)
        config = self.config
        if model in config.models or model in config.remotes or self.places is None:
            return JSONResponse(entry(config, name, model, self.status(model), self.created))
        peer = next(place.peer.name for m, place in self.places.offered() if m == model and place.peer)
        return JSONResponse(peer_entry(model, peer, self.status(model), self.created))

    async def load(self, request: Request) -> Response:
        """Load the model as a request would (the matrix decides what stops); answer once it
        is loaded."""
        model = await self._named(request)
        self._here(model)
        status = self.status(model)["value"]
        if status in ("loaded", "loading"):
            raise RequestError(400, f"model '{model}' is already running ({status})", "model_already_running")
        async with await (await self.host_for(model, request)).acquire(model):
            pass
        return JSONResponse({"success": True})

    async def unload(self, request: Request) -> Response:
        """Stop the model once its requests in flight finish; answer once it is stopped."""
        model = await self._named(request)
        self._here(model)
        if not await self.fleet.unload(model):
            raise RequestError(400, f"model '{model}' is not running", "model_not_running")
        return JSONResponse({"success": True})

    async def host_for(self, model: str, request: Request) -> Swapper:
        """The swapper of the host that would serve a request for `model` now (the one it is
        on, else the one whose plan evicts least), as a request chooses."""
        if self.places is None:
            return self.swapper
        where = await self.places.choose(model, request.scope, here_only=True)
        return self.places.swapper_of(where) if isinstance(where, Here) else self.swapper

    def _here(self, model: str) -> None:
        """A model this box does not run is loaded and unloaded where it runs."""
        if model not in self.config.models:
            message = (
                f"model '{model}' is served elsewhere (a peer or a proxy: model): load and unload it there"
            )
            raise RequestError(400, message, "model_elsewhere")

    async def _named(self, request: Request) -> str:
        """The model a router request's JSON body names: 400 for a body without one."""
        body = await read_body(request.scope, request.receive, self.swapper.config.max_request_bytes)
        name, _ = json_model(body)
        return self.resolve(name)
