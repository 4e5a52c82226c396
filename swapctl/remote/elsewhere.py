"""Servers elsewhere: peers (another swapctl, a llama-swap, any OpenAI-compatible server) and
the servers of `proxy:` models. swapctl starts and stops nothing there; it watches them.

Each is a `Place` with a circuit: `threshold` failures in a row (a refused or hung
connection, a broken answer, a probe unanswered) open it, and while it is open no request is
sent there (each gets a 502 naming it at once) while the watch probes it every `interval`
seconds; the first answer closes it. A peer's probe is `GET /v1/models`, which also says what
it serves (`models: auto`) and each model's state (`status.value`, as swapctl, llama-swap and
llama-server's router list them).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from swapctl.config import Peer, Remote, Timeouts

log = logging.getLogger("swapctl")
THRESHOLD = 2  # failures in a row that open a circuit
INTERVAL = 2.0  # seconds between two probes of a peer (and of an open circuit)
PROBE_TIMEOUT = 2.0  # seconds a probe may take: a peer that hangs is noticed as one that refuses
AGAIN = 0.25  # seconds before a peer whose probe just failed is probed again
# a swapctl peer's /events: a keep-alive comment comes every 15 s, so a silent stream is dead
EVENTS_TIMEOUT = httpx.Timeout(PROBE_TIMEOUT, read=45.0)
# a swapctl row's state -> the status value its model list gives it
LISTED = {"ready": "loaded", "pulling": "loading", "starting": "loading", "sleeping": "sleeping"}


@dataclass
class Circuit:
    """Failures in a row of one place; open from `threshold` on, until an answer."""

    threshold: int = THRESHOLD
    failures: int = 0
    last_error: str | None = None
    opened_at: float | None = None  # monotonic seconds

    @property
    def open(self) -> bool:
        return self.opened_at is not None

    def failed(self, error: str, now: float) -> bool:
        """Count a failure; whether it opened the circuit."""
        self.failures += 1
        self.last_error = error
        if self.opened_at is None and self.failures >= self.threshold:
            self.opened_at = now
            return True
        return False

    def answered(self) -> float | None:
        """An answer: the circuit closes; the seconds it had been open, if it was."""
        opened, self.opened_at, self.failures = self.opened_at, None, 0
        return None if opened is None else time.monotonic() - opened


@dataclass
class Place:
    """A server elsewhere, as forwarding sees it."""

    label: str  # "peer 'gpu2'", or "model 'gpt''s server": what errors and logs call it
    url: str
    api_key: str | None
    timeouts: Timeouts
    peer: Peer | None = None  # None: a `proxy:` model's server
    circuit: Circuit = field(default_factory=Circuit)
    models: tuple[str, ...] = ()  # what a peer serves: configured, or as it last listed them
    statuses: dict[str, str] = field(default_factory=dict)  # a peer's models' status.value
    followed: set[str] = field(default_factory=set)  # those its /events reports on, live
    answers_plans: bool = True  # a swapctl: GET /plan/<model> answers (until it does not)

    def failed(self, error: str) -> None:
        if self.circuit.failed(error, time.monotonic()):
            log.warning(
                "%s is not answering (%d failures in a row, the last: %s): nothing is sent there until it "
                "answers again",
                self.label,
                self.circuit.failures,
                error,
            )

    def answered(self) -> None:
        down = self.circuit.answered()
        if down is not None:
            log.info("%s answers again, after %.1fs", self.label, down)

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def peer_place(peer: Peer) -> Place:
    key = peer.api_key.get_secret_value() if peer.api_key else None
    place = Place(f"peer '{peer.name}'", peer.url, key, peer.timeouts, peer)
    place.models = peer.models or ()
    return place


def remote_place(model: str, remote: Remote) -> Place:
    key = remote.api_key.get_secret_value() if remote.api_key else None
    return Place(f"model '{model}''s server at {remote.url}", remote.url, key, remote.timeouts)


class Watch:
    """The peers' watch: each probed every `interval` seconds, its models and their states
    kept. `peers` gives the config's peers now (a reload replaces them; unchanged ones keep
    what is known of them). Without a `client`, it makes one when it first needs it, and
    `aclose` closes it."""

    def __init__(
        self,
        peers: Callable[[], Mapping[str, Peer]],
        client: httpx.AsyncClient | None,
        interval: float = INTERVAL,
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self._client, self._owned, self.interval = client, client is None, interval
        self.probe_timeout = probe_timeout
        self.source = peers
        self.seen: Mapping[str, Peer] | None = None
        self.changed: Callable[[Place], None] = lambda place: None  # its models' states, or it, changed
        self._places: dict[str, Place] = {}

    @property
    def places(self) -> dict[str, Place]:
        peers = self.source()
        if peers is not self.seen:
            self.seen = peers
            kept = {name: place for name, place in self._places.items() if place.peer == peers.get(name)}
            self._places = {name: kept.get(name) or peer_place(peer) for name, peer in peers.items()}
        return self._places

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient()
        return self._client

    async def aclose(self) -> None:
        if self._owned and self._client is not None:
            await self._client.aclose()

    async def run(self) -> None:
        """Probe every peer, forever (a task of the app's lifespan): each on its own, so that
        one that hangs delays no other; a reload's peers are taken up within `interval`."""
        probing: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                places = {id(place): place for place in self.places.values()}
                for key in probing.keys() - places.keys():
                    probing.pop(key).cancel()
                for key in places.keys() - probing.keys():
                    place = places[key]
                    probing[key] = asyncio.create_task(self._watch(place))
                await asyncio.sleep(self.interval)
        finally:
            for task in probing.values():
                task.cancel()

    async def _watch(self, place: Place) -> None:
        await asyncio.gather(self._keep_probing(place), self.follow(place))

    async def follow(self, place: Place) -> None:
        """A swapctl peer's own `/events`: its models' states as they change, between probes.
        A peer whose `/events` is not an event stream (not a swapctl) is left to its probes."""
        while True:
            try:
                async with self.client.stream(
                    "GET", f"{place.url}/events", headers=place.headers(), timeout=EVENTS_TIMEOUT
                ) as answer:
                    if not answer.headers.get("content-type", "").startswith("text/event-stream"):
                        return
                    async for name, data in sse_events(answer.aiter_lines()):
                        self._told(place, name, data)
            except (httpx.HTTPError, ValueError):
                pass
            place.followed = set()  # its probes say it all again until the stream is back
            await asyncio.sleep(self.interval)

    def _told(self, place: Place, name: str, data: Any) -> None:
        rows = data.get("models", ()) if name == "snapshot" else (data,) if name == "model" else ()
        changed = False
        for row in rows:
            model = row.get("model") if isinstance(row, dict) else None
            if not isinstance(model, str) or "place" in row:  # served elsewhere by it: its list says
                continue
            place.followed.add(model)
            value = LISTED.get(str(row.get("state")), "unloaded")
            if place.statuses.get(model) != value:
                place.statuses[model] = value
                changed = True
        if changed:
            self.changed(place)

    async def _keep_probing(self, place: Place) -> None:
        while True:
            await self.probe(place)
            # one that just failed is probed again at once: its circuit opens (or not) sooner
            doubted = place.circuit.failures and not place.circuit.open
            await asyncio.sleep(AGAIN if doubted else self.interval)

    async def probe(self, place: Place) -> None:
        before = (place.circuit.open, dict(place.statuses), place.models)
        await self._probe(place)
        if (place.circuit.open, place.statuses, place.models) != before:
            self.changed(place)

    async def _probe(self, place: Place) -> None:
        try:
            answer = await self.client.get(
                f"{place.url}/v1/models", headers=place.headers(), timeout=httpx.Timeout(self.probe_timeout)
            )
            answer.raise_for_status()
            listed = answer.json().get("data")
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            place.failed(_said(error))
            return
        place.answered()
        entries = (
            [e for e in listed if isinstance(e, dict) and isinstance(e.get("id"), str)] if listed else []
        )
        if place.peer is not None and place.peer.models is None:
            place.models = tuple(e["id"] for e in entries)
        # the models its /events reports on keep the newer word of the two
        place.statuses = {
            e["id"]: place.statuses.get(e["id"], "") if e["id"] in place.followed else _status(e)
            for e in entries
        }

    def offering(self, model: str) -> list[Place]:
        """The peers that serve `model`, in the config's order."""
        return [place for place in self.places.values() if model in place.models]

    async def plan_cost(self, place: Place, model: str) -> int | None:
        """What loading `model` there would evict, by the peer's own plan (`GET /plan/<model>`
        on a swapctl); None where the peer has no plan to tell."""
        if not place.answers_plans:
            return None
        try:
            answer = await self.client.get(
                f"{place.url}/plan/{quote(model, safe='')}", headers=place.headers(), timeout=PROBE_TIMEOUT
            )
            cost = answer.json().get("cost") if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        if answer.status_code in (404, 405) and not isinstance(cost, int):
            place.answers_plans = False  # not a swapctl: it has no plans
        return cost if isinstance(cost, int) else None


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, Any]]:
    """(event name, its JSON data) of a Server-Sent Events stream's lines; comments skipped."""
    name, data = "message", ""
    async for line in lines:
        if not line:
            if data:
                yield name, json.loads(data)
            name, data = "message", ""
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data += line.removeprefix("data:").strip()


def _status(entry: Mapping[str, Any]) -> str:
    status = entry.get("status")
    value = status.get("value") if isinstance(status, dict) else None
    return value if isinstance(value, str) else "unknown"


def _said(error: Exception) -> str:
    if isinstance(error, httpx.HTTPStatusError):
        return f"GET /v1/models answered {error.response.status_code}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
