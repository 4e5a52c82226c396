"""The lifecycle of model containers: decide with the policy, apply through the backend.

    stopped -> starting -> ready -> stopping -> stopped

Requests for a starting model join that start. A model chosen for eviction is `leaving`:
it admits no new request, finishes the ones in flight, then stops; only then does the
model that evicted it start. Swaps run as tasks, so swaps of disjoint models overlap.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from swapctl.backend import Backend, Container
from swapctl.config import Config
from swapctl.errors import BackendError, Busy, StartError, SwapctlError
from swapctl.matrix import Decision
from swapctl.metrics import Metrics
from swapctl.spec import build_spec

log = logging.getLogger("swapctl")


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"


@dataclass
class Slot:
    model: str
    state: State = State.STOPPED
    container: Container | None = None
    in_flight: int = 0
    leaving: bool = False
    last_used: float = 0.0
    ready_since: float | None = None
    start: asyncio.Future[None] | None = field(default=None, repr=False)
    stops: int = 0  # times it returned to stopped: a stop awaited is over even if it started again


@dataclass(frozen=True)
class ModelStatus:
    model: str
    state: str
    container: str | None
    host_port: int | None
    in_flight: int
    ready_seconds: float | None
    idle_seconds: float | None

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


class Swapper:
    def __init__(
        self,
        config: Config,
        backend: Backend,
        client: httpx.AsyncClient,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.backend = backend
        self.client = client
        self.clock = clock
        self.slots = {model: Slot(model) for model in config.models}
        self.changed = asyncio.Condition()
        self.swaps: set[asyncio.Task[None]] = set()
        self.metrics = Metrics()
        self.metrics.watch(lambda: [(s.model, s.state, s.in_flight) for s in self.status()])

    # --- requests -------------------------------------------------------------------------

    async def acquire(self, model: str) -> Slot:
        """Wait until `model` is ready and count one request in flight on it."""
        slot = self.slots[model]
        async with self.changed:
            while True:
                if slot.leaving or slot.state is State.STOPPING:
                    await self.changed.wait()
                    continue
                limit = self.config.models[model].concurrency_limit
                if slot.in_flight >= limit:
                    raise Busy(model, limit)
                slot.in_flight += 1
                if slot.state is State.READY:
                    return slot
                if slot.state is State.STOPPED:
                    self._claim(slot)
                break
        assert slot.start is not None
        try:
            await asyncio.shield(slot.start)
        except BaseException:
            await self.release(slot)
            raise
        return slot

    async def release(self, slot: Slot) -> None:
        async with self.changed:
            slot.in_flight -= 1
            slot.last_used = self.clock()
            self.changed.notify_all()

    def running(self) -> list[str]:
        return sorted(m for m, s in self.slots.items() if s.state is not State.STOPPED and not s.leaving)

    def _claim(self, slot: Slot) -> None:
        """Decide and mark, with no await in between: the next decision sees this one."""
        began = time.perf_counter()
        decision = self.config.policy.decide(slot.model, self.running())
        decided = time.perf_counter() - began
        keep = set(decision.target_set)
        leaving_already = [(s, s.stops) for s in self.slots.values() if s.leaving and s.model not in keep]
        for model in decision.evict:
            self.slots[model].leaving = True
        slot.state = State.STARTING
        slot.start = asyncio.get_running_loop().create_future()
        slot.start.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may be waiting
        swap = asyncio.get_running_loop().create_task(self._swap(slot, decision, leaving_already, decided))
        self.swaps.add(swap)  # the loop keeps only weak references to tasks
        swap.add_done_callback(self.swaps.discard)

    async def _swap(
        self, slot: Slot, decision: Decision, leaving_already: list[tuple[Slot, int]], decided: float
    ) -> None:
        began = time.monotonic()
        assert slot.start is not None
        try:
            await asyncio.gather(*(self._evict(self.slots[m]) for m in decision.evict))
            async with self.changed:
                # each has stopped once since the decision; one claimed again since then was
                # decided with this model counted as running, so it waits for us, not we for it
                await self.changed.wait_for(
                    lambda: all(s.state is State.STOPPED or s.stops != n for s, n in leaving_already)
                )
            container = await self._start(slot)
        except BaseException as error:
            failure = error if isinstance(error, SwapctlError) else StartError(slot.model, repr(error))
            await self._stopped(slot)
            log.error("%s", failure)
            self.metrics.starts.labels(slot.model, "failed").inc()
            slot.start.set_exception(failure)
            if not isinstance(error, Exception):
                raise
            return
        async with self.changed:
            slot.state, slot.container = State.READY, container
            slot.ready_since = slot.last_used = self.clock()
            self.changed.notify_all()
        self.metrics.starts.labels(slot.model, "ready").inc()
        self.metrics.start_seconds.labels(slot.model).observe(time.monotonic() - began)
        evicted = ", ".join(decision.evict) or "nothing"
        log.info(
            "swap: %s ready in %.3fs (set %s, evicted %s, cost %d, decided in %.0fus)",
            slot.model,
            time.monotonic() - began,
            decision.set or "-",
            evicted,
            decision.cost,
            decided * 1e6,
        )
        slot.start.set_result(None)

    # --- containers -----------------------------------------------------------------------

    async def _start(self, slot: Slot) -> Container:
        model = self.config.models[slot.model]
        spec = build_spec(self.config, slot.model)
        log.info("starting %s (%s)", slot.model, spec.image)
        container = await asyncio.to_thread(self.backend.start, spec)
        slot.container = container
        timeout = model.health_check_timeout or self.config.health_check_timeout
        try:
            return await self._wait_healthy(slot.model, container, model.health, timeout)
        except BaseException:
            await asyncio.to_thread(self.backend.stop, container.id, 0)
            raise

    async def _wait_healthy(self, model: str, container: Container, path: str, timeout: float) -> Container:
        """Poll from the first moment, every few tens of milliseconds, backing off a little."""
        began = time.monotonic()
        interval, checked, noted = 0.01, began, began
        while True:
            published = container.host_port is not None
            if published and (path == "none" or await self._healthy(container.url + path)):
                return container
            now = time.monotonic()
            if now - checked >= 0.1 or not published:
                checked = now
                current = await asyncio.to_thread(self.backend.get, container.id)
                if current is not None and current.running:
                    container = current  # the port may be published a moment after the start
                else:
                    logs = await asyncio.to_thread(self.backend.logs, container.id, 20)
                    state = current.state if current else "removed"
                    tail = f"; last log lines:\n{logs.rstrip()}" if logs.strip() else ""
                    raise StartError(model, f"the container {state} while starting{tail}")
            if now - began > timeout:
                raise StartError(model, f"no HTTP 200 from {path} within healthCheckTimeout ({timeout:g}s)")
            if now - noted >= 5:
                noted = now
                log.info("still loading %s (%.0fs)", model, now - began)
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, 0.2)

    async def _healthy(self, url: str) -> bool:
        try:
            response = await self.client.get(url, timeout=2.0)
        except httpx.TransportError:
            return False  # refused, reset, or the port proxy not yet forwarding
        return response.status_code == 200

    async def _evict(self, slot: Slot) -> None:
        async with self.changed:
            slot.leaving = True
            await self.changed.wait_for(
                lambda: slot.state in (State.READY, State.STOPPED) and slot.in_flight == 0
            )
            if slot.state is State.STOPPED or slot.container is None:
                slot.leaving = False
                self.changed.notify_all()
                return
            slot.state = State.STOPPING
            container = slot.container
        self.metrics.evictions.labels(slot.model).inc()
        try:
            grace = self.config.models[slot.model].stop_grace_period
            await asyncio.to_thread(self.backend.stop, container.id, grace)
        finally:
            await self._stopped(slot, evicted=True)
        log.info("stopped %s", slot.model)

    async def _stopped(self, slot: Slot, evicted: bool = False) -> None:
        """Every way back to stopped goes through here: waiting swaps count the stops.
        Only the eviction itself ends `leaving`; a crash or failed start leaves it to that."""
        async with self.changed:
            slot.state, slot.container = State.STOPPED, None
            slot.leaving = slot.leaving and not evicted
            slot.stops += 1
            self.changed.notify_all()

    # --- the engine as the database ---------------------------------------------------------

    async def adopt(self) -> list[str]:
        """Take over this instance's running containers whose spec still matches; remove the rest."""
        adopted: list[str] = []
        for container in await asyncio.to_thread(self.backend.list, self.config.instance):
            slot = self.slots.get(container.model)
            spec = build_spec(self.config, container.model) if slot is not None else None
            image = await asyncio.to_thread(self.backend.image_id, spec.image) if spec else None
            fits = (
                slot is not None
                and spec is not None
                and slot.state is State.STOPPED
                and container.running
                and container.host_port is not None
                and container.spec_hash == spec.spec_hash
                and (image is None or container.image_id == image)  # an image rebuilt under its name
            )
            if slot is not None and fits:
                slot.state, slot.container = State.READY, container
                slot.ready_since = slot.last_used = self.clock()
                adopted.append(container.model)
                log.info("adopted %s (%s)", container.model, container.name)
            else:
                why = "its spec or image changed" if slot is not None and container.running else "left over"
                log.info("removing %s: %s", container.name, why)
                await asyncio.to_thread(self.backend.stop, container.id, 10)
        return adopted

    async def check(self) -> None:
        """Notice crashed containers and idle models past their ttl."""
        present = {c.id: c for c in await asyncio.to_thread(self.backend.list, self.config.instance)}
        now = self.clock()
        for slot in self.slots.values():
            if slot.state is not State.READY or slot.leaving or slot.container is None:
                continue
            current = present.get(slot.container.id)
            if current is None or not current.running:
                await self.mark_crashed(slot)
                continue
            ttl = self.config.models[slot.model].ttl or self.config.global_ttl
            if ttl and slot.in_flight == 0 and now - slot.last_used >= ttl:
                log.info("ttl: %s idle for %.0fs", slot.model, now - slot.last_used)
                await self._evict(slot)
        # remains that could not be removed earlier (say, while the daemon was down)
        tracked = {s.container.id for s in self.slots.values() if s.container is not None}
        for container in present.values():
            owner = self.slots.get(container.model)
            if container.id in tracked or container.running or (owner and owner.state is not State.STOPPED):
                continue
            log.info("removing %s: %s", container.name, container.state)
            await asyncio.to_thread(self.backend.stop, container.id, 0)

    async def mark_crashed(self, slot: Slot) -> bool:
        """The container died: remove its remains; the model is stopped. False if already handled."""
        async with self.changed:
            if slot.state is not State.READY or slot.container is None:
                return False
            container, slot.state = slot.container, State.STOPPING
            self.changed.notify_all()
        log.warning("%s: its container %s stopped unexpectedly", slot.model, container.name)
        self.metrics.crashes.labels(slot.model).inc()
        try:
            await asyncio.to_thread(self.backend.stop, container.id, 0)
        except BackendError as error:
            log.warning("could not remove %s: %s", container.name, error)
        finally:
            await self._stopped(slot)
        return True

    async def confirm_alive(self, slot: Slot) -> bool:
        """After a failed forward: False (and the model stopped) if its container is gone."""
        if slot.container is None:
            return False
        current = await asyncio.to_thread(self.backend.get, slot.container.id)
        if current is None or not current.running:
            await self.mark_crashed(slot)
            return False
        return True

    async def unload(self, model: str | None = None) -> list[str]:
        targets = [self.slots[model]] if model else list(self.slots.values())
        busy = [s for s in targets if s.state is not State.STOPPED and not s.leaving]
        await asyncio.gather(*(self._evict(s) for s in busy))
        return [s.model for s in busy]

    def status(self) -> list[ModelStatus]:
        now = self.clock()
        return [
            ModelStatus(
                model=slot.model,
                state="leaving" if slot.leaving and slot.state is State.READY else slot.state.value,
                container=slot.container.name if slot.container else None,
                host_port=slot.container.host_port if slot.container else None,
                in_flight=slot.in_flight,
                ready_seconds=now - slot.ready_since
                if slot.ready_since and slot.state is State.READY
                else None,
                idle_seconds=now - slot.last_used
                if slot.state is State.READY and not slot.in_flight
                else None,
            )
            for slot in self.slots.values()
        ]
