"""Changes to the agreed event contract: two additions. When a model that a reload removed
has stopped and is forgotten, a `model` event carries its ROW with `state` "removed" (and no
container): drop its row. A ROW carries `gpu_memory`, the model's footprint as last measured
where a GPU exists (bytes per GPU index), else null; a `model` event goes out when it is measured.

What the proxy has been doing, for people and tools to watch: the last swaps, each model's
request and token rates, and events for subscribers (GET /events, `swapctl status --watch`,
the page at /ui).

Each event goes out as `event: NAME\\ndata: JSON\\n\\n`:

    snapshot  {"models": [ROW...], "swaps": [SWAP...] (oldest first), "logs": [str...]}
              (the first event of a stream: the state it starts from; the last 100 log lines)
    model     ROW: one model's row changed (its state, its container); a change only of its
              requests in flight is sent with the next `stats`, at most one row a second
    swap      SWAP: a swap ended, ready or failed
    reload    what a reload changed, as POST /reload answers it
    log       {"line": str}: a line of the proxy's log
    stats     {"models": {MODEL: {"requests_per_s": float, "tokens_per_s": float,
              "requests": int}}}, every second while someone subscribes, for every model
              served at least once
    request   a request ended, as GET /requests lists it (`swapctl.proxy.record`)

    ROW  = {"model", "state", "container", "host_port", "in_flight", "ready_seconds",
            "idle_seconds", "gpu_memory": {GPU index: bytes} | null (as `ModelStatus`),
            "last_start_seconds": float | null,
            "requests": int, "requests_per_s": float, "tokens_per_s": float}
    SWAP = {"at": epoch seconds when it ended, "model", "set": str | null, "evicted": [str],
            "cost": int, "seconds": float, "ok": bool, "error": str | null}

GET /events also sends a comment, `: keep-alive`, every 15 s.

Rates are over the last WINDOW seconds: requests answered, and the tokens their answers
reported, divided by WINDOW. Recording costs the request path one or two deque operations
(`served`); with nobody subscribed, a change of state costs one test.

A subscriber whose queue holds BACKLOG events it has not read is dropped (its stream ends; it
may connect again for a new snapshot): a slow reader never holds the swapper up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from swapctl.lifecycle.history import History
from swapctl.lifecycle.slot import ModelStatus

WINDOW = 10.0  # seconds the rates look back
KEEP_SWAPS = 100
BACKLOG = 1000  # events a subscriber may leave unread before it is dropped
STATS_EVERY = 1.0  # seconds
EVENTS = frozenset({"model", "swap", "reload", "log", "stats", "request"})
REMOVED = "removed"  # the state of a row whose model a reload removed, once it is gone

Row = dict[str, Any]


@dataclass(frozen=True)
class Swap:
    at: float  # epoch seconds, when it ended
    model: str
    set: str | None
    evicted: tuple[str, ...]
    cost: int
    seconds: float
    ok: bool
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "evicted": list(self.evicted)}


@dataclass(frozen=True)
class Rates:
    requests_per_s: float
    tokens_per_s: float
    requests: int  # since the proxy started

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Event:
    name: str
    data: Any  # JSON-able

    @functools.cached_property
    def frame(self) -> bytes:
        """The event as Server-Sent Events send it; encoded once for every subscriber."""
        return f"event: {self.name}\ndata: {json.dumps(self.data)}\n\n".encode()


@dataclass
class _Served:
    requests: int = 0
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (when, tokens), within WINDOW


class Subscription:
    """One subscriber's events, in order, as an async iterator; it ends when it is dropped
    (it fell `backlog` events behind: what it had not read is dropped too), when the block
    of its `with` ends, or when the proxy shuts down (after what is queued)."""

    def __init__(self, activity: Activity, names: frozenset[str], backlog: int) -> None:
        self.activity, self.names, self.backlog = activity, names, backlog
        self.queue: deque[Event] = deque()
        self.arrived = asyncio.Event()
        self.ended = False
        self.dropped = False

    def offer(self, event: Event) -> None:
        if self.ended:
            return
        if len(self.queue) >= self.backlog:
            self.dropped = True
            self.queue.clear()  # it could not keep up: a new snapshot serves it better
            self.end()
            return
        self.queue.append(event)
        self.arrived.set()

    def end(self) -> None:
        """No more events: a reader takes what is queued, then stops."""
        self.ended = True
        self.arrived.set()
        self.activity.unsubscribe(self)

    def take_queued(self) -> list[Event]:
        """The events that came and are not read yet, all at once (none: an empty list)."""
        taken = list(self.queue)
        self.queue.clear()
        return taken

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self.queue:
            if self.ended:
                raise StopAsyncIteration
            self.arrived.clear()
            await self.arrived.wait()
        return self.queue.popleft()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


class Activity:
    """The record and its subscribers. `row(model)` is the model's ROW now (None once it is
    gone): the owner's, so that rows changed only in flight go out with the next stats.
    `clock` measures rates (monotonic), `wall` dates swaps (epoch)."""

    def __init__(
        self,
        row: Callable[[str], Row | None],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        *,
        window: float = WINDOW,
        keep: int = KEEP_SWAPS,
        backlog: int = BACKLOG,
        stats_every: float = STATS_EVERY,
    ) -> None:
        self.row, self.clock, self.wall = row, clock, wall
        self.window, self.backlog, self.stats_every = window, backlog, stats_every
        self.swaps: deque[Swap] = deque(maxlen=keep)
        self.subscriptions: set[Subscription] = set()
        self.closed = False
        self._served: dict[str, _Served] = {}
        self.last_hour = History(wall)  # the last hour, for the page's charts (GET /history)
        self._dirty: set[str] = set()  # models whose requests in flight changed since the last stats
        self._closers: set[Callable[[], None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.Task[None] | None = None

    # --- recording ------------------------------------------------------------------------

    def served(self, model: str, status: int, seconds: float, tokens: int | None) -> None:
        """One request answered (any status), with the tokens its answer reported."""
        now = self.clock()
        counts = self._served.get(model)
        if counts is None:
            counts = self._served[model] = _Served()
        counts.requests += 1
        counts.recent.append((now, tokens or 0))
        _forget_before(counts.recent, now - self.window)
        self.last_hour.served(model, tokens)

    def swapped(self, swap: Swap) -> None:
        self.swaps.append(swap)
        self.publish("swap", swap.to_json())

    def changed(self, model: str, state: str | None = None) -> None:
        """The model's state (or container) changed: its row goes out now. `state`: the state
        it is in, for the history (None: only something else changed)."""
        if state is not None:
            self.last_hour.state(model, state)
        if self.subscriptions:
            self._dirty.discard(model)
            found = self.row(model)
            if found is not None:
                self.publish("model", found)

    def touched(self, model: str) -> None:
        """The model's requests in flight changed: its row goes out with the next stats."""
        if self.subscriptions:
            self._dirty.add(model)

    def removed(self, model: str) -> None:
        """A model a reload removed is gone."""
        self._served.pop(model, None)
        self._dirty.discard(model)
        self.last_hour.state(model, REMOVED)
        gone = ModelStatus(model, REMOVED, None, None, 0, None, None)
        self.publish("model", self.with_rates(gone, None))

    def reloaded(self, changes: dict[str, Any]) -> None:
        self.publish("reload", changes)

    def logged(self, line: str) -> None:
        """A line of the proxy's log; any thread may call this."""
        self.publish("log", {"line": line})

    # --- reading --------------------------------------------------------------------------

    def rates(self, model: str) -> Rates:
        counts = self._served.get(model)
        if counts is None:
            return Rates(0.0, 0.0, 0)
        _forget_before(counts.recent, self.clock() - self.window)
        tokens = sum(t for _, t in counts.recent)
        return Rates(len(counts.recent) / self.window, tokens / self.window, counts.requests)

    def stats(self) -> dict[str, Any]:
        return {"models": {model: self.rates(model).to_json() for model in self._served}}

    def with_rates(self, status: ModelStatus, last_start: float | None) -> Row:
        """A model's ROW: its status, its last start's duration, and its rates."""
        return {**status.to_json(), "last_start_seconds": last_start, **self.rates(status.model).to_json()}

    def history(self) -> list[dict[str, Any]]:
        """The last swaps, oldest first."""
        return [swap.to_json() for swap in self.swaps]

    # --- subscribers ----------------------------------------------------------------------

    def subscribe(self, names: Collection[str] = EVENTS) -> Subscription:
        """A subscription to the events named (on the event loop); one made after `close`
        has ended already."""
        subscription = Subscription(self, frozenset(names), self.backlog)
        if self.closed:
            subscription.end()
            return subscription
        self._loop = asyncio.get_running_loop()
        self.subscriptions.add(subscription)
        if self._ticker is None:
            self._ticker = self._loop.create_task(self._tick())
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)
        if not self.subscriptions and self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
            self._dirty.clear()

    def publish(self, name: str, data: Any) -> None:
        """Hand an event to its subscribers; from another thread, through the event loop."""
        if not self.subscriptions:
            return
        event = Event(name, data)
        try:
            here = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            here = False
        if here:
            self._offer(event)
        elif self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody listens
                self._loop.call_soon_threadsafe(self._offer, event)

    def _offer(self, event: Event) -> None:
        for subscription in list(self.subscriptions):
            if event.name in subscription.names:
                subscription.offer(event)

    async def _tick(self) -> None:
        """Every `stats_every` seconds while someone subscribes: the rates, and the rows whose
        requests in flight changed."""
        while True:
            await asyncio.sleep(self.stats_every)
            dirty, self._dirty = self._dirty, set()
            for model in sorted(dirty):
                found = self.row(model)
                if found is not None:
                    self.publish("model", found)
            self.publish("stats", self.stats())

    # --- shutting down --------------------------------------------------------------------

    @contextlib.contextmanager
    def until_closed(self, close: Callable[[], None]) -> Iterator[None]:
        """While the block runs, `close` is called if the proxy shuts down (a stream that
        would never end on its own ends then)."""
        if self.closed:
            close()
        self._closers.add(close)
        try:
            yield
        finally:
            self._closers.discard(close)

    def close(self) -> None:
        """The proxy shuts down: every subscription ends, and every stream registered with
        `until_closed` is closed, so that no open stream holds the shutdown up."""
        self.closed = True
        for subscription in list(self.subscriptions):
            subscription.end()
        for close in list(self._closers):
            close()


def _forget_before(recent: deque[tuple[float, int]], oldest: float) -> None:
    while recent and recent[0][0] <= oldest:
        recent.popleft()
