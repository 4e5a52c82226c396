"""The upkeep: what runs is checked every few seconds, level-triggered, whatever happened
since: models stuck in a transitional state (the watchdog), crashed containers, servers that
fell asleep behind swapctl's back, idle models past their ttl, containers that would not
stop, and remains of dead ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from swapctl.backend import Container
from swapctl.config import Config
from swapctl.errors import Overdue, StopFailed, SwapctlError
from swapctl.lifecycle.board import Board
from swapctl.lifecycle.reconciling import Reconciler
from swapctl.lifecycle.slot import TRANSITIONAL, Slot, State, Step
from swapctl.lifecycle.stopping import Stops

log = logging.getLogger("swapctl")
MARGIN = 60.0  # seconds beyond the config's own bounds: engine calls, GPU memory coming back


class Upkeep:
    def __init__(self, board: Board, stops: Stops, reconciler: Reconciler) -> None:
        self.board, self.stops, self.reconciler = board, stops, reconciler

    async def run(self, interval: float) -> None:
        """Run `check` every `interval` seconds, for as long as the proxy serves."""
        while True:
            await self.board.health.clock.sleep(interval)
            try:
                await self.check()
            except SwapctlError as error:
                log.warning("checking containers: %s", error)

    async def check(self) -> None:
        """The upkeep duties: models stuck in a transitional state, crashed containers, servers
        that fell asleep behind swapctl's back, idle models past their ttl, containers that
        would not stop, and remains of dead ones."""
        present = {c.id: c for c in await self.board.backend.list(self.board.config.instance)}
        await self.watchdog()
        await self._check_crashes(present)
        await self._check_asleep()
        await self._check_ttl()
        await self._retry_stuck()
        await self._remove_remains(present)
        async with self.board.changed:
            for slot in list(self.board.slots.values()):
                self.reconciler.forget(slot)  # removed by a reload, and stopped since

    async def _check_crashes(self, present: Mapping[str, Container]) -> None:
        for slot in list(self.board.slots.values()):  # a reload may add or drop slots meanwhile
            if slot.state in (State.READY, State.SLEEPING) and slot.container is not None:
                current = present.get(slot.container.id)
                if current is None or not current.running:
                    await self.stops.mark_crashed(slot)

    async def _check_ttl(self) -> None:
        now = self.board.clock()
        for slot in list(self.board.slots.values()):
            if slot.state not in (State.READY, State.SLEEPING) or slot.in_flight:
                continue  # asleep past its ttl: stopped for real
            ttl = self.board.config_for(slot.model).models[slot.model].ttl
            if ttl and now - slot.last_used >= ttl:
                log.info("ttl: %s idle for %.0fs", slot.model, now - slot.last_used)
                await self.stops.evict(slot)

    async def _retry_stuck(self) -> None:
        for slot in list(self.board.slots.values()):
            if slot.state is State.STOP_FAILED and not slot.leaving:
                with contextlib.suppress(StopFailed):  # said by _stuck; tried again next time
                    await self.stops.evict(slot)

    async def _remove_remains(self, present: Mapping[str, Container]) -> None:
        """Remains that could not be removed earlier (say, while the daemon was down)."""
        tracked = {s.container.id for s in self.board.slots.values() if s.container is not None}
        for container in present.values():
            owner = self.board.slots.get(container.model)
            if container.id in tracked or container.running or (owner and owner.phase is not State.STOPPED):
                continue
            log.info("removing %s: %s", container.name, container.state)
            await self.board.backend.stop(container.id, 0)

    async def _check_asleep(self) -> None:
        """A ready `sleep` model whose server says it sleeps (a sleep asked by an `up` killed
        before it answered ends after the adoption) counts as asleep: the next request wakes it."""
        for slot in list(self.board.slots.values()):
            model = self.board.config.models.get(slot.model)
            container = slot.container
            if model is None or model.sleep is None or slot.state is not State.READY or slot.in_flight:
                continue
            if container is not None and await self.board.sleep_mode.asleep(container) is True:
                async with self.board.changed:
                    if slot.state is State.READY and not slot.in_flight and slot.container is container:
                        self.board.move(slot, State.STOPPING, owner=asyncio.current_task())
                        self.board.move(slot, State.SLEEPING)
                        log.warning("%s: its server %s sleeps; counted as asleep", slot.model, container.name)

    async def watchdog(self) -> None:
        """A model in a transitional state with no live task moving it, or past the deadline its
        config sets, is repaired: logged, its waiters answered at once (503, naming the cause),
        its task cancelled (its own clean-up moves the slot to rest once the engine has
        answered: a start to stopped, a stop to stop-failed while its container may run; until
        then it counts as it did), or, with no task left, its slot moved to rest here; counted
        in /metrics; /health says degraded for a while. It should never fire."""
        now = self.board.clock()
        for slot in list(self.board.slots.values()):
            if slot.phase not in TRANSITIONAL:
                continue
            owner, limit = slot.owner, deadline(slot, self.board.config_for(slot.model))
            if owner is not None and not owner.done() and (limit is None or now - slot.since <= limit):
                continue
            if owner is not None and not owner.done() and owner.cancelling():
                continue  # asked to end already: its clean-up waits for the engine's answer
            why = "no task moves it" if owner is None or owner.done() else f"past its deadline ({limit:g}s)"
            await self._repair(slot, why)

    async def _repair(self, slot: Slot, why: str) -> None:
        state, step = slot.state.value, slot.step.value if slot.step else None
        error = Overdue(f"stuck {state}{f' ({step})' if step else ''}: {why}; swapctl ended it", slot.model)
        log.error("watchdog: %s (%d requests waiting)", error, slot.in_flight)
        self.board.metrics.watchdog.labels(slot.model, state).inc()
        self.board.alarms[slot.model] = (self.board.clock(), error)
        if slot.start is not None and not slot.start.done():
            slot.start.set_exception(error)  # its waiters are answered now
        owner = slot.owner
        if owner is not None and not owner.done():
            owner.cancel(str(error))  # its own clean-up moves it to rest, once the engine answers
            return
        async with self.board.changed:  # nobody would: the watchdog does
            self.board.move(slot, State.STOP_FAILED if slot.container is not None else State.STOPPED)


def deadline(slot: Slot, config: Config) -> float | None:
    """How long the slot's current step may last, from its config: a container's start and
    health check, a wake, a stop (or a sleep); None where requests in flight of the models it
    evicts, or a pull, set the pace (the owner is still checked)."""
    model = config.models.get(slot.model)
    health = model.health_check_timeout if model is not None else 0
    grace = config.stop_grace(slot.model)
    if slot.phase is State.STOPPING:
        return grace + health + MARGIN
    if slot.phase is State.STARTING and slot.step in (Step.STARTING, Step.LOADING, Step.WAKING):
        return health + grace + MARGIN
    return None
