"""Stopping: evicting a model once its requests finish (or putting it to sleep), removing a
container (a graceful stop, then a kill), a container that would not stop, one that crashed,
and unloading.

An eviction ends with the tenure it was asked to end: it marks the model leaving (it admits
no new request), waits until the model's start under way (if any) settles and its requests
in flight finish, then stops it and moves it to stopped (or sleeping, or stop-failed). If
the model stopped meanwhile, by another eviction or a crash, the eviction is over: it never
waits for a later start of the same model.
"""

from __future__ import annotations

import asyncio
import logging

from swapctl.backend import Container
from swapctl.errors import BackendError, StopFailed
from swapctl.lifecycle.board import SETTLED, Board, outdated
from swapctl.lifecycle.lease import Lease
from swapctl.lifecycle.sleep_mode import NotDone
from swapctl.lifecycle.slot import Slot, State
from swapctl.spec import build_spec

log = logging.getLogger("swapctl")


class Stops:
    def __init__(self, board: Board) -> None:
        self.board = board

    async def remove(self, model: str, container: Container, grace: float) -> None:
        """Stop gracefully, else kill; StopFailed only while the container still runs."""
        try:
            await self.board.backend.stop(container.id, grace)
            return
        except Exception as error:
            log.warning("%s: stopping %s failed (%s); killing it", model, container.name, error)
        try:
            await self.board.backend.stop(container.id, 0)
            return
        except Exception as error:
            current = await self.board.backend.get(container.id)
            if current is None or not current.running:
                return  # dead; the upkeep check removes its remains
            raise StopFailed(f"its container {container.name} could not be stopped: {error}", model) from None

    async def evict(self, slot: Slot, patience: float | None = None, sleep: bool = False) -> None:
        """Stop the model once its requests in flight finish, or after `patience` seconds
        regardless of them (a start under way always finishes first). With `sleep` (to make
        room), a ready model with a sleep level is put to sleep instead, or stopped if it
        cannot; without, a sleeping one is stopped for real."""
        async with self.board.changed:
            stops = slot.stops  # this tenure: once it is over (stopped by another), so is this eviction
            self.board.move(slot, leaving=True)
            try:
                async with asyncio.timeout(patience):
                    await self.board.changed.wait_for(
                        lambda: slot.stops != stops or (slot.phase in SETTLED and slot.in_flight == 0)
                    )
            except TimeoutError:
                await self.board.changed.wait_for(lambda: slot.stops != stops or slot.phase in SETTLED)
            if slot.stops != stops:
                return
            if slot.phase is State.STOPPED or slot.container is None:
                self.board.move(slot, leaving=False)
                return
            container = slot.container
            level = self._sleep_level(slot, container) if sleep and slot.phase is State.READY else None
            was_asleep = slot.phase is State.SLEEPING  # its memory is freed already
            self.board.move(slot, State.STOPPING, owner=asyncio.current_task())
        self.board.metrics.evictions.labels(slot.model).inc()
        try:
            if level is not None and await self._sleep(slot, container, level):
                return
            if self.board.gpu is not None and not was_asleep:  # the memory it holds now, to see it come back
                await self.board.gpu.stopping(slot.model, container)
            await self.remove(slot.model, container, self.board.grace(slot.model))
        except BaseException:
            await self.stuck(slot)
            raise
        await self.board.set(slot, State.STOPPED)
        log.info("stopped %s", slot.model)

    def _sleep_level(self, slot: Slot, container: Container) -> int | None:
        """The level to put the evicted model to sleep at: its `sleep`, while the current config
        would run its container as it is; None: stop it."""
        model = self.board.config.models.get(slot.model)
        if model is None or model.sleep is None:
            return None
        return None if outdated(container, build_spec(self.board.config, slot.model)) else model.sleep

    async def _sleep(self, slot: Slot, container: Container, level: int) -> bool:
        """Put the stopping model to sleep: True once it sleeps, False (warned) if it must be
        stopped instead."""
        if self.board.gpu is not None:  # its process stays: only its memory is seen come back
            await self.board.gpu.stopping(slot.model, container, asleep=True)
        timeout = self.board.config.models[slot.model].health_check_timeout
        try:
            await self.board.sleep_mode.sleep(container, level, timeout)
        except NotDone as error:
            log.warning("%s: sleep failed (%s); stopping it instead", slot.model, error)
            return False
        await self.board.set(slot, State.SLEEPING)
        log.info("sleep: %s asleep at level %d (%s)", slot.model, level, container.name)
        return True

    async def stuck(self, slot: Slot) -> None:
        """Its container would not stop: it keeps counting as running until it is gone."""
        await self.board.set(slot, State.STOP_FAILED)
        log.error(
            "%s: its container %s could not be stopped; it counts as running", slot.model, name_of(slot)
        )

    async def mark_crashed(self, slot: Slot) -> bool:
        """The container died: remove its remains; the model is stopped. False if already handled."""
        async with self.board.changed:
            if slot.phase not in (State.READY, State.SLEEPING) or slot.container is None:
                return False
            container = slot.container
            self.board.move(slot, State.STOPPING, owner=asyncio.current_task())
        log.warning("%s: its container %s stopped unexpectedly", slot.model, container.name)
        self.board.metrics.crashes.labels(slot.model).inc()
        try:
            await self.board.backend.stop(container.id, 0)
        except BackendError as error:
            log.warning("could not remove %s: %s", container.name, error)
        finally:
            await self.board.set(slot, State.STOPPED)
        return True

    async def confirm_alive(self, lease: Lease) -> bool:
        """After a failed forward: False (and the model stopped) if its container is gone."""
        slot = self.board.slots.get(lease.model)
        if slot is None or slot.container is None or slot.container.id != lease.container.id:
            return False
        current = await self.board.backend.get(lease.container.id)
        if current is None or not current.running:
            await self.mark_crashed(slot)
            return False
        return True

    async def unload(self, model: str | None = None, timeout: float | None = None) -> list[str]:
        """Stop one model or all, once their requests in flight finish, or after `timeout`
        seconds regardless of them. The models that were running."""
        targets = [self.board.slot(model)] if model else list(self.board.slots.values())
        busy = [s for s in targets if s.phase is not State.STOPPED]
        await asyncio.gather(*(self.evict(s, timeout) for s in busy))
        return [s.model for s in busy]


def name_of(slot: Slot) -> str:
    return slot.container.name if slot.container else "-"
