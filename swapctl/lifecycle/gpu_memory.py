"""GPU memory, seen through the inventory: what each model holds once ready (its footprint),
and, after a model is stopped to make room, the wait until that memory is back, since a
driver may release it after `docker stop` returns.

Every read of the inventory runs in a thread. The wait polls from at once, backing off from
100 ms to 1 s, and is bounded: past `bound` it warns and lets the start go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from swapctl.backend import Container
from swapctl.gpus import (
    Inventory,
    MeasuredFootprint,
    Release,
    Snapshot,
    listed_by_device,
    measured_footprint,
    still_held,
    used_by_device,
)
from swapctl.lifecycle.health import Clock, backoff
from swapctl.metrics import Metrics

log = logging.getLogger("swapctl")
RELEASE_WAIT = 30.0  # seconds a start waits at most for an evicted model's memory


class GpuMemory:
    def __init__(
        self, inventory: Inventory, clock: Clock, metrics: Metrics, bound: float = RELEASE_WAIT
    ) -> None:
        self.inventory, self.clock, self.bound = inventory, clock, bound
        self.seconds = metrics.release_seconds()
        self.footprints: dict[str, MeasuredFootprint] = {}  # model -> what it held when last measured
        self.releases: dict[str, Release] = {}  # model -> its stop, while its memory is not seen back

    async def measure(self, container: Container) -> MeasuredFootprint | None:
        """What the container's processes hold on each GPU now; None if none runs on a GPU."""
        return await asyncio.to_thread(self._measure, container.id)

    async def stopping(self, model: str, container: Container, asleep: bool = False) -> None:
        """The container is about to stop (or its server to sleep: `asleep`): note each
        device's used memory, if its footprint is known, so that a start can see that memory
        come back."""
        measured = self.footprints.get(model)
        if measured is None or measured.container != container.id:
            return
        found = await asyncio.to_thread(self.inventory.read)
        if isinstance(found, Snapshot):
            self.releases[model] = Release(measured, used_by_device(found), listed_by_device(found), asleep)

    async def snapshot(self) -> Snapshot | None:
        """The devices now (read in a thread); None where the driver shows none."""
        found = await asyncio.to_thread(self.inventory.read)
        return found if isinstance(found, Snapshot) else None

    def started(self, model: str) -> None:
        """The model starts again: its last stop concerns no one now."""
        self.releases.pop(model, None)

    async def until_freed(self, model: str, evicted: Iterable[str]) -> None:
        """Wait until the memory of the `evicted` models is back, for the start of `model`;
        past the bound, warn (naming each model and device) and go on."""
        waiting = {m: r for m in evicted if (r := self.releases.get(m)) is not None}
        if not waiting:
            return
        began, noted = self.clock.now(), False
        for interval in backoff(0.1, most=1.0):
            held = await asyncio.to_thread(self._held, waiting)
            elapsed = self.clock.now() - began
            for freed in [m for m in waiting if m not in held]:
                self._done(freed, waiting.pop(freed), elapsed)
            if not waiting:
                return
            if elapsed >= self.bound:
                self._give_up(model, waiting, held, elapsed)
                return
            if not noted:
                noted = True
                log.info("waiting for GPU memory of %s to be freed", ", ".join(waiting))
            await self.clock.sleep(interval)

    def _give_up(
        self, model: str, waiting: dict[str, Release], held: dict[str, tuple[int, ...]], elapsed: float
    ) -> None:
        for late, release in waiting.items():
            gpus = ", ".join(map(str, held[late]))
            log.warning(
                "GPU memory of %s on GPU %s not freed after %.0fs; starting %s anyway",
                late,
                gpus,
                elapsed,
                model,
            )
            self._done(late, release, elapsed)

    def _done(self, model: str, release: Release, elapsed: float) -> None:
        self.seconds.labels(model).observe(elapsed)
        if self.releases.get(model) is release:
            del self.releases[model]

    def _measure(self, container: str) -> MeasuredFootprint | None:
        found = self.inventory.read()
        return (
            measured_footprint(found, container, self.inventory.cgroup)
            if isinstance(found, Snapshot)
            else None
        )

    def _held(self, waiting: dict[str, Release]) -> dict[str, tuple[int, ...]]:
        """Each waiting model whose memory is not back yet, with the devices it still holds."""
        found = self.inventory.read()
        if not isinstance(found, Snapshot):
            return {}  # the GPUs are gone from view: nothing left to see
        held = {m: still_held(r, found, self.inventory.cgroup) for m, r in waiting.items()}
        return {m: devices for m, devices in held.items() if devices}
