"""The swapper: the face the proxy and the CLI use, over the lifecycle's rooms.

A request is admitted (`admit`: counted in flight, its model claimed if it is stopped), then
waits for its model's start (`Ticket.lease`), then holds a lease until it ends. Requests for
a starting model join that start. What the rooms do:

- `board`: the shared state, its lock and its one writer (`Board.move`);
- `starts`: claim, decide, pull, place, start, health, wake;
- `stops`: evict, remove, sleep, a container that would not stop, a crash, unload;
- `reconciler`: a reload, and adopting what runs at start-up;
- `upkeep`: the periodic checks, the watchdog among them.

The life of a model (its states, moves, owners and deadlines) is written down in `slot`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import httpx

from swapctl.backend import Backend, Container
from swapctl.backend.aio import AsyncBackend
from swapctl.config import Config
from swapctl.errors import BackendError, Busy, StopFailed, SwapctlError
from swapctl.gpus import Inventory
from swapctl.lifecycle.activity import Activity, Row
from swapctl.lifecycle.board import Board
from swapctl.lifecycle.changes import Changes
from swapctl.lifecycle.gpu_memory import RELEASE_WAIT
from swapctl.lifecycle.lease import Lease, Ticket
from swapctl.lifecycle.reconciling import Reconciler
from swapctl.lifecycle.slot import ModelStatus, Progress, Slot, State, Step
from swapctl.lifecycle.starting import Starts
from swapctl.lifecycle.stopping import Stops, name_of
from swapctl.lifecycle.upkeep import Upkeep
from swapctl.matrix import Decision, Policy
from swapctl.measures import MeasureStore
from swapctl.metrics import Metrics

log = logging.getLogger("swapctl")


class Swapper:
    def __init__(
        self,
        config: Config,
        backend: Backend | AsyncBackend,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
        inventory: Inventory | None = None,
        release_wait: float = RELEASE_WAIT,
        measures: MeasureStore | None = None,
    ) -> None:
        board = Board(
            config, backend, client, self.row, clock, sleep, metrics, inventory, release_wait, measures
        )
        self.board = board
        self.stops = Stops(board)
        self.starts = Starts(board, self.stops)
        self.reconciler = Reconciler(board, self.stops, self.starts)
        self.upkeeping = Upkeep(board, self.stops, self.reconciler)
        # what other packages and the tests read: the board's own objects
        self.slots, self.images, self.tasks = board.slots, board.images, board.tasks
        self.changed, self.backend, self.metrics = board.changed, board.backend, board.metrics
        self.activity: Activity = board.activity
        statuses = lambda: [(s.model, s.state, s.in_flight) for s in self.status()]  # noqa: E731
        self.metrics.watch(statuses, [state.value for state in State])

    @property
    def config(self) -> Config:
        return self.board.config  # a reload replaces it

    @property
    def measures(self) -> MeasureStore:
        return self.board.measures

    # --- requests -------------------------------------------------------------------------

    async def acquire(self, model: str) -> Lease:
        """Wait until `model` is ready; the lease counts one request in flight on it."""
        return await (await self.admit(model)).lease()

    async def admit(self, model: str) -> Ticket:
        """Count one request in flight on `model`, starting it if it is stopped (after waiting
        for a stop under way), or refuse it now (busy, stop-failed, unknown). The wait for
        the start is the ticket's `lease()`."""
        async with self.board.changed:
            slot = self.board.slot(model)
            while slot.leaving or slot.phase is State.STOPPING:
                await self.board.changed.wait()
                slot = self.board.slot(model)  # a reload may have removed it meanwhile
            if slot.phase is State.STOP_FAILED:
                raise StopFailed(f"its old container {name_of(slot)} could not be stopped yet", model)
            limit = self.board.config.models[model].concurrency_limit
            if slot.in_flight >= limit:
                raise Busy(model, limit)
            slot.in_flight += 1
            self.board.activity.touched(model)
            if slot.phase in (State.STOPPED, State.SLEEPING):
                self.starts.claim(slot)
            ready = slot.container if slot.phase is State.READY else None
        return Ticket(model, ready, lambda: self._join(slot), lambda: self._release(slot), self)

    async def _join(self, slot: Slot) -> Container:
        """The container of an admitted request's model, once ready."""
        if slot.phase is not State.READY:
            assert slot.start is not None
            await asyncio.shield(slot.start)  # join the start; leaving it leaves the start alone
        if slot.container is None:
            raise BackendError("its container stopped as it became ready", slot.model)
        return slot.container

    async def _release(self, slot: Slot) -> None:
        async with self.board.changed:
            slot.in_flight -= 1
            slot.last_used = self.board.clock()
            self.board.activity.touched(slot.model)
            self.board.changed.notify_all()

    async def preload(self) -> None:
        """Start the configured models one by one, as requests would: the matrix still decides."""
        for model in self.board.config.preload:
            try:
                await (await self.acquire(model)).release()
            except SwapctlError as error:
                log.error("preload: %s", error)

    # --- the rooms' doors -------------------------------------------------------------------

    def running(self) -> list[str]:
        return self.board.running()

    def policy(self) -> Policy:
        return self.board.policy()

    def degraded(self) -> list[str]:
        """Why /health says degraded: the watchdog's recent repairs; empty when all is well."""
        return self.board.degraded()

    async def unload(self, model: str | None = None, timeout: float | None = None) -> list[str]:
        return await self.stops.unload(model, timeout)

    async def mark_crashed(self, slot: Slot) -> bool:
        return await self.stops.mark_crashed(slot)

    async def confirm_alive(self, lease: Lease) -> bool:
        return await self.stops.confirm_alive(lease)

    async def reload(self, config: Config) -> Changes:
        return await self.reconciler.reload(config)

    async def adopt(self) -> list[str]:
        return await self.reconciler.adopt()

    async def check(self) -> None:
        await self.upkeeping.check()

    async def upkeep(self, interval: float) -> None:
        await self.upkeeping.run(interval)

    # --- what people see --------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        now = self.board.clock()
        return [self._status(slot, now) for slot in self.board.slots.values()]

    def _status(self, slot: Slot, now: float) -> ModelStatus:
        measured = self.board.gpu.footprints.get(slot.model) if self.board.gpu else None
        return ModelStatus.of(
            slot, now, measured.to_json() if measured else None, self.board.placed.get(slot.model)
        )

    def row(self, model: str) -> Row | None:
        """The model's row for people: its status, its last start's duration, its rates."""
        slot = self.board.slots.get(model)
        if slot is None:
            return None
        last_start = slot.durations[-1] if slot.durations else None
        return self.board.activity.with_rates(self._status(slot, self.board.clock()), last_start)

    def rows(self) -> list[Row]:
        return [row for model in list(self.board.slots) if (row := self.row(model)) is not None]

    def plan(self, model: str) -> Decision:
        """What a request for `model` would decide now, changing nothing."""
        self.board.slot(model)
        return self.board.policy().decide(model, self.board.running())

    def progress(self, model: str) -> Progress | None:
        """How far the start of `model` has come; None unless it is starting."""
        slot = self.board.slots.get(model)
        progress = Progress.of(slot, self.board.clock()) if slot is not None else None
        before_wake = (Step.PULLING, Step.EVICTING, Step.WAKING)
        if progress is None or slot is None or slot.container is None or progress.step not in before_wake:
            return progress
        measured = self.board.measures.get(model, slot.container.spec_hash)  # a sleeping one, woken
        return replace(progress, waking=True, last_starts=measured.wakes if measured else ())

    def last_starts(self, model: str) -> tuple[float, ...]:
        """The durations of its last measured starts, in seconds, oldest first."""
        slot = self.board.slots.get(model)
        return tuple(slot.durations) if slot is not None else ()

    def container(self, model: str) -> Container | None:
        """The container the model runs now (or is starting), if any."""
        return self.board.slot(model).container

    async def logs(self, model: str, tail: int) -> str:
        """The last lines of the model's container: the one it runs, else any left of it."""
        found = self.board.slot(model).container or next(
            (c for c in await self.board.backend.list(self.board.config.instance) if c.model == model), None
        )
        return await self.board.backend.logs(found.id, tail) if found else ""
