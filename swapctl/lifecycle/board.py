"""The shared state of the lifecycle, its lock, and its one writer.

Every room (starts, stops, the reconciler, the upkeep) reads and changes the models' slots
through one `Board`. Its rule, which keeps the matrix an invariant:

- **One writer.** A slot's state changes only in `move` (the condition's lock held), which
  wakes whoever waits for a change. Nothing else assigns state.
- **Decide and mark with no await in between.** A decision reads `running()` and marks what
  it evicts as leaving in the same turn of the event loop, so the next decision sees it.
- **Every wait ends.** A wait on the condition names what it waits for (a tenure, by its
  count of stops, not a model's name), so a model stopped and started again since is not
  waited for; each transitional state has the one task that owns it (`Slot.owner`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx

from swapctl.backend import Backend, Container
from swapctl.backend.aio import AsyncBackend
from swapctl.config import Config
from swapctl.errors import Overdue, UnknownModelError
from swapctl.gpus import Inventory
from swapctl.lifecycle.activity import Activity, Row
from swapctl.lifecycle.gpu_memory import RELEASE_WAIT, GpuMemory
from swapctl.lifecycle.health import Clock, HealthCheck
from swapctl.lifecycle.sleep_mode import SleepMode
from swapctl.lifecycle.slot import RESTING, Slot, State
from swapctl.matrix import Policy
from swapctl.measures import MeasureStore, costed_policy
from swapctl.metrics import Metrics
from swapctl.spec import ContainerSpec

# no start or stop under way
SETTLED = (State.READY, *RESTING)
DEGRADED_FOR = 300.0  # seconds /health says degraded after the watchdog repaired a model


class Board:
    def __init__(
        self,
        config: Config,
        backend: Backend | AsyncBackend,
        client: httpx.AsyncClient,
        row: Callable[[str], Row | None],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        metrics: Metrics | None = None,
        inventory: Inventory | None = None,
        release_wait: float = RELEASE_WAIT,
        measures: MeasureStore | None = None,
    ) -> None:
        self.config = config
        self.backend = backend if isinstance(backend, AsyncBackend) else AsyncBackend(backend)
        self.clock = clock
        self.health = HealthCheck(self.backend, client, Clock(clock, sleep))
        self.sleep_mode = SleepMode(client, self.health.clock)  # vLLM's sleep and wake, for `sleep` models
        self.slots = {model: Slot(model) for model in config.models}
        self.retiring: dict[str, Config] = {}  # removed by a reload, not yet stopped: their config
        self.images: set[str] = set()  # known to be on the machine: a start needs no pull first
        self.changed = asyncio.Condition()
        self.tasks: set[asyncio.Task[None]] = set()
        self.metrics = metrics or Metrics()
        self.measures = measures or MeasureStore()  # starts, wakes and footprints, kept across restarts
        # policy() as last built, and from what: the config, the measures' generation, placements
        self._costed: tuple[Config, int, dict[str, tuple[int, ...]], Policy] | None = None
        self.gpu: GpuMemory | None = None  # footprints and verified evictions, where a GPU exists
        self.placed: dict[str, tuple[int, ...]] = {}  # model -> the GPUs swapctl chose for its container
        if inventory is not None:
            self.gpu = GpuMemory(inventory, self.health.clock, self.metrics, release_wait)
        self.activity = Activity(row, clock)  # what people and tools watch: swaps, rates, events
        self.alarms: dict[str, tuple[float, Overdue]] = {}  # model -> when the watchdog last repaired it, why

    def degraded(self) -> list[str]:
        """What the watchdog repaired in the last DEGRADED_FOR seconds, for /health."""
        now = self.clock()
        return [str(error) for at, error in self.alarms.values() if now - at < DEGRADED_FOR]

    def running(self) -> list[str]:
        return sorted(m for m, s in self.slots.items() if s.running)

    def slot(self, model: str) -> Slot:
        """The slot of a configured model: one a reload removed is unknown at once."""
        slot = self.slots.get(model)
        if slot is None or model not in self.config.models:
            raise UnknownModelError(model)
        return slot

    def config_for(self, model: str) -> Config:
        """The config `model` runs under: the current one, or, for a model a reload removed
        that has yet to stop, the last one that named it."""
        return self.config if model in self.config.models else self.retiring[model]

    def grace(self, model: str) -> float:
        """Its stop grace period; the default for a leftover of a model no config names."""
        return self.retiring.get(model, self.config).stop_grace(model)

    def policy(self) -> Policy:
        """The config's policy, deciding with the measured cost of each `evict_costs: auto`
        model and the GPUs each container was given; built again only when the config, a
        kept measurement or a placement changed."""
        config, generation = self.config, self.measures.generation
        # a container's GPUs, while it exists (running, or asleep: it wakes there)
        placed = {
            m: d
            for m, d in self.placed.items()
            if (s := self.slots.get(m)) is not None and (s.container is not None or s.phase is State.STARTING)
        }
        built = self._costed
        if built is None or built[0] is not config or built[1] != generation or built[2] != placed:
            policy = costed_policy(config, self.measures).with_placement(placed)
            self._costed = built = (config, generation, placed, policy)
        return built[3]

    def move(self, slot: Slot, phase: State | None = None, **changes: Any) -> None:
        """Every change of state goes through here (the condition's lock held): it wakes
        whoever waits for one."""
        slot.move(phase, now=self.clock(), **changes)
        self.changed.notify_all()
        self.activity.changed(slot.model, slot.state.value)

    async def set(self, slot: Slot, phase: State | None = None, **changes: Any) -> None:
        async with self.changed:
            self.move(slot, phase, **changes)

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)
        return task


def outdated(container: Container, spec: ContainerSpec, image_id: str | None = None) -> bool:
    """Whether `container` runs something other than `spec` would start: another spec hash,
    or (where the image's current ID is known) an image rebuilt under its name since."""
    return container.spec_hash != spec.spec_hash or (image_id is not None and container.image_id != image_id)
