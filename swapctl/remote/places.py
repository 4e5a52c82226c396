"""Where a request for a model goes: one of this box's hosts (its swapper's containers: this
machine's engine, or another machine's under `hosts:`), a peer, or the server of a `proxy:`
model.

A model served in one place goes there. A model of several hosts, or offered here and by
peers, goes where it is loaded; else where it is loading; else where it sleeps; else to the
place whose own plan evicts least (a host's swapper's `plan`, `GET /plan/<model>` on a
swapctl peer; a peer with no plan comes after those with one), ties to the order written:
the model's `hosts`, then the peers. A host claims a start at admission, with no await
between the choice and the claim; while a request waits on a peer it chose cold, every
request for that model goes there too: two requests never make two boxes load the same
model. A peer whose circuit is open, or a host whose engine does not answer, is passed
over; when every place of a model is, the request gets a 502 (503 for hosts) naming them.

A request forwarded to a peer carries `X-Swapctl-Via`, the nodes it passed through; one that
arrives with this node in it, or past `MAX_HOPS`, is refused (508), and one that came from
another swapctl is served here whenever this box has the model.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from starlette.types import Scope

from swapctl.config import Config, Remote
from swapctl.config.hosts import LOCAL_NAME
from swapctl.errors import BackendError, ElsewhereUnavailable, Loop, UnknownModelError
from swapctl.lifecycle import Fleet, Row, State, Swapper
from swapctl.remote.elsewhere import Place, Watch, remote_place

VIA = b"x-swapctl-via"
MAX_HOPS = 8
# how far a model is from serving, by its state: loaded, loading, asleep, not running
_NEAR = {"loaded": 0, "loading": 1, "sleeping": 2}
_HERE = {State.READY: 0, State.PULLING: 1, State.STARTING: 1, State.SLEEPING: 2}
NOWHERE = None  # _near's answer for a model loaded, loading or asleep in none of its places
# a place's status value by the name swapctl gives the state (in /running, /events, status)
_STATE = {"loaded": State.READY, "loading": State.STARTING, "sleeping": State.SLEEPING}


@dataclass(frozen=True)
class Here:
    model: str
    host: str = LOCAL_NAME  # whose swapper: this machine's, or a host's under `hosts:`


@dataclass(frozen=True)
class There:
    model: str
    place: Place
    via: bytes  # the X-Swapctl-Via to send on: the nodes so far, and this one


Target = Here | There


Candidate = Place | str  # a place elsewhere, or one of this box's hosts by name


class Places:
    def __init__(self, fleet: Fleet, watch: Watch, node: str | None = None) -> None:
        self.fleet, self.watch = fleet, watch
        self.swapper = fleet.local  # this machine's: its activity is what /events streams
        self.node = node or secrets.token_hex(6)  # this process, in X-Swapctl-Via
        self.remotes: dict[str, tuple[Remote, Place]] = {}
        self.cold: dict[str, tuple[Place, int]] = {}  # model -> the peer it was sent to cold, requests
        self.locks: dict[str, asyncio.Lock] = {}
        self.flying: dict[str, int] = {}  # requests on their way elsewhere, by model
        watch.changed = self._changed

    @property
    def config(self) -> Config:
        return self.fleet.config

    def swapper_of(self, where: Here) -> Swapper:
        return self.fleet.swappers[where.host]

    def resolve(self, name: str) -> str:
        """The model ID a request's name stands for: a model, alias or variant here, a
        `proxy:` model, or a model a peer serves."""
        model = self.config.resolve(name)
        if model is not None:
            return model
        if self.watch.offering(name):
            return name
        raise UnknownModelError(name)

    def offered(self) -> Iterator[tuple[str, Place]]:
        """(model, peer) of every model the peers serve, in the config's order."""
        for place in self.watch.places.values():
            for model in place.models:
                yield model, place

    def status(self, model: str) -> dict[str, object]:
        """A model served elsewhere (too), as the model list shows it: the nearest to serving
        of its places' states; a `proxy:` model's server is `loaded` while it answers."""
        if model in self.config.remotes:
            place = self._remote_place(model, self.config.remotes[model])
            return {"value": "unloaded", "failed": True} if place.circuit.open else {"value": "loaded"}
        places: list[Candidate] = [host for host, _ in self.fleet.hosts_of(model)]
        places += [place for place in self.watch.offering(model) if not place.circuit.open]
        near = min((self._nearness(model, place) for place in places), default=len(_NEAR))
        return {"value": next((name for name, rank in _NEAR.items() if rank == near), "unloaded")}

    def rows(self) -> list[Row]:
        """A row for each model on another host (its swapper's, `place` naming the host), and
        for each model served only elsewhere, as `/running` and `/events` show the models
        here: its state by swapctl's names, `place` saying where (a peer's name, or `proxy`),
        no container here."""
        config = self.config
        found = [{**row, "place": host} for host, swapper in self.fleet.remote() for row in swapper.rows()]
        found += [self.row(model) for model in config.remotes]
        seen = {*config.models, *config.remotes}
        for model, _ in self.offered():
            if model not in seen:
                seen.add(model)
                found.append(self.row(model))
        return found

    def row(self, model: str) -> Row:
        remote = model in self.config.remotes
        value = str(self.status(model)["value"])
        peers = self.watch.offering(model)
        place = (
            "proxy" if remote else next((p.peer.name for p in peers if p.peer and not p.circuit.open), None)
        )
        place = place or (peers[0].peer.name if peers and peers[0].peer else "-")
        state = _STATE.get(value, State.STOPPED).value
        return {
            "model": model,
            "state": state,
            "container": None,
            "host_port": None,
            "in_flight": self.flying.get(model, 0),
            "ready_seconds": None,
            "idle_seconds": None,
            "gpu_memory": None,
            "gpus": None,
            "place": place,
            "last_start_seconds": None,
            **self.swapper.activity.rates(model).to_json(),
        }

    async def relay(self) -> None:
        """The other hosts' live events on this machine's stream (a task of the app's
        lifespan): each `model` row with `place` naming its host, each swap as it ends."""
        await asyncio.gather(*(self._relay(host, swapper) for host, swapper in self.fleet.remote()))

    async def _relay(self, host: str, swapper: Swapper) -> None:
        with swapper.activity.subscribe({"model", "swap"}) as subscription:
            async for event in subscription:
                data = {**event.data, "place": host} if isinstance(event.data, dict) else event.data
                self.swapper.activity.publish(event.name, data)

    def _changed(self, place: Place) -> None:
        """A peer's models changed state (or it went away, or came back): their rows go out."""
        config = self.config
        for model in place.models:
            if model not in config.models:
                self.swapper.activity.publish("model", self.row(model))

    def passed(self, scope: Scope) -> bytes:
        """The nodes a request passed through; Loop if this is one of them."""
        via = next((value for name, value in scope["headers"] if name == VIA), b"")
        nodes = [node.strip() for node in via.split(b",") if node.strip()]
        if self.node.encode() in nodes or len(nodes) >= MAX_HOPS:
            path = " -> ".join(node.decode("latin-1") for node in nodes)
            raise Loop(
                f"this request came back to a swapctl it passed through already ({path}): check the peers"
            )
        return via

    async def choose(self, model: str, scope: Scope, *, here_only: bool = False) -> Target:
        """Where a request for `model` (an ID from `resolve`) goes now; among this box's hosts
        only with `here_only` (swapctl's own load routes)."""
        via = self.passed(scope)
        config = self.config
        remote = config.remotes.get(model)
        if remote is not None:
            return self._there(model, self._remote_place(model, remote), via)
        all_hosts = [host for host, _ in self.fleet.hosts_of(model)]
        hosts: list[Candidate] = [host for host in all_hosts if host not in self.fleet.down]
        # one that came from another swapctl is served on this box, never sent on again
        peers = [] if hosts and (via or here_only) else self.watch.offering(model)
        if len(hosts) == 1 and not peers:
            return Here(model, str(hosts[0]))
        places = hosts + [place for place in peers if not place.circuit.open]
        if not places:
            down = [f"host '{h}': {self.fleet.down[h]}" for h in all_hosts if h in self.fleet.down]
            down += [f"{p.label}: {p.circuit.last_error}" for p in peers]
            if all_hosts and not peers:  # its hosts' engines: 503, as an engine's trouble is
                raise BackendError(f"no host of it answers ({'; '.join(down)})", model)
            raise ElsewhereUnavailable(f"no place that serves it answers ({'; '.join(down)})", model)
        chosen = self._near(model, places)
        if chosen is NOWHERE:
            async with self.locks.setdefault(model, asyncio.Lock()):
                chosen = self._near(model, places)  # another request may have chosen meanwhile
                if chosen is NOWHERE:
                    chosen = await self._cheapest(model, places)
                    if isinstance(chosen, Place):  # a host claims its start at admission
                        self.cold[model] = (chosen, 0)
        return Here(model, chosen) if isinstance(chosen, str) else self._there(model, chosen, via)

    def _there(self, model: str, place: Place, via: bytes) -> There:
        if place.circuit.open:
            raise ElsewhereUnavailable(
                f"{place.label} is not answering ({place.circuit.last_error}); nothing is sent there until it "
                "answers again",
                model,
            )
        node = self.node.encode()
        return There(model, place, via + b", " + node if via else node)

    def _near(self, model: str, places: list[Candidate]) -> Candidate | None:
        """The place where the model is nearest to serving (loaded, loading, asleep), or the
        peer it was sent to cold; NOWHERE where it is nowhere near."""
        cold = self.cold.get(model)
        if cold is not None and cold[0] in places:
            return cold[0]
        best, i = min((self._nearness(model, place), i) for i, place in enumerate(places))
        return places[i] if best < len(_NEAR) else NOWHERE

    def _nearness(self, model: str, place: Candidate) -> int:
        if isinstance(place, str):
            slot = self.fleet.swappers[place].slots.get(model)
            return _HERE.get(slot.state, len(_NEAR)) if slot is not None else len(_NEAR)
        return _NEAR.get(place.statuses.get(model, ""), len(_NEAR))

    async def _cheapest(self, model: str, places: list[Candidate]) -> Candidate:
        """The place whose own plan evicts least; unknown costs last; ties to the order."""

        async def cost(place: Candidate) -> float:
            if isinstance(place, str):
                return self.fleet.swappers[place].plan(model).cost
            found = await self.watch.plan_cost(place, model)
            return float("inf") if found is None else found

        costs = await asyncio.gather(*(cost(place) for place in places))
        return places[min(range(len(places)), key=lambda i: (costs[i], i))]

    def hold(self, target: Target) -> None:
        """A request sent to `target` is on its way: a cold choice stays while any is."""
        cold = self.cold.get(target.model)
        if cold is not None and isinstance(target, There) and cold[0] is target.place:
            self.cold[target.model] = (cold[0], cold[1] + 1)

    def done(self, target: Target) -> None:
        """A request's answer came (or it failed): once none is on its way, the cold choice
        is forgotten, and the place is taken to be loading it until its next probe says."""
        cold = self.cold.get(target.model)
        if cold is None or not isinstance(target, There) or cold[0] is not target.place:
            return
        if cold[1] <= 1:
            del self.cold[target.model]
            statuses = target.place.statuses if isinstance(target, There) else {}
            if statuses.get(target.model) not in ("loaded", "loading"):
                statuses[target.model] = "loading"
        else:
            self.cold[target.model] = (cold[0], cold[1] - 1)

    def _remote_place(self, model: str, remote: Remote) -> Place:
        """A `proxy:` model's place, kept (its circuit with it) while its config is the same."""
        found = self.remotes.get(model)
        if found is None or found[0] != remote:
            found = self.remotes[model] = (remote, remote_place(model, remote))
        return found[1]


class Sent:
    """A request on its way to a place elsewhere: what forwarding holds instead of a Lease.
    `release` (once is enough) ends its hold on a cold choice."""

    def __init__(self, target: There, places: Places) -> None:
        self.target, self.places = target, places
        self.model, self.url, self.place = target.model, target.place.url, target.place
        places.hold(target)
        places.flying[self.model] = places.flying.get(self.model, 0) + 1
        self._held = True

    async def release(self) -> None:
        if self._held:
            self._held = False
            self.places.flying[self.model] -= 1
            self.places.done(self.target)
