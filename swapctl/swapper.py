"""The lifecycle of model containers: decide with the policy, apply through the backend.

    stopped -> starting -> ready -> stopping -> stopped
                                       stopping -> stop-failed -> stopping (retried)

Requests for a starting model join that start. A model chosen for eviction is `leaving`:
it admits no new request, finishes the ones in flight, then stops; only then does the
model that evicted it start. Swaps run as tasks, so swaps of disjoint models overlap.

The matrix is an invariant: a container counts as running for every decision until it is
gone. One that could not be stopped (nor killed) is `stop-failed`, not stopped; the upkeep
check and the next eviction try again. Containers found at start-up are adopted only as far
as the policy allows them together, and only once their health check answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from swapctl.backend import Backend, Container
from swapctl.config import Config
from swapctl.errors import BackendError, Busy, StartError, StopFailed, SwapctlError
from swapctl.matrix import Decision, allowed_part
from swapctl.metrics import Metrics
from swapctl.spec import build_spec

log = logging.getLogger("swapctl")
DEFAULT_GRACE = 10.0  # seconds, for a container of a model no longer configured


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOP_FAILED = "stop-failed"  # its container outlived a stop and a kill: it still counts as running


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
        self.tasks: set[asyncio.Task[None]] = set()
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
                if slot.state is State.STOP_FAILED:
                    raise StopFailed(f"its old container {_name(slot)} could not be stopped yet", model)
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
        self._launch(slot, self._swap(slot, decision, leaving_already, decided))

    def _launch(self, slot: Slot, start: Coroutine[Any, Any, None]) -> None:
        """The model is starting: requests wait on `slot.start`, which `start` settles."""
        slot.state = State.STARTING
        slot.start = asyncio.get_running_loop().create_future()
        slot.start.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may be waiting
        self._spawn(start)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)

    async def _swap(
        self, slot: Slot, decision: Decision, leaving_already: list[tuple[Slot, int]], decided: float
    ) -> None:
        began = time.monotonic()
        try:
            await asyncio.gather(*(self._evict(self.slots[m]) for m in decision.evict))
            await self._until_gone(slot.model, leaving_already)
            container = await self._start(slot)
        except BaseException as error:
            await self._start_failed(slot, error)
            if not isinstance(error, Exception):
                raise
            return
        await self._ready(slot, container)
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

    async def _until_gone(self, model: str, leaving: list[tuple[Slot, int]]) -> None:
        """Wait for models another swap is evicting. Each has stopped once since the decision;
        one claimed again since then was decided with this model counted as running, so it
        waits for us, not we for it. One whose stop failed still runs: this start fails."""
        async with self.changed:
            await self.changed.wait_for(
                lambda: all(s.state in (State.STOPPED, State.STOP_FAILED) or s.stops != n for s, n in leaving)
            )
        stuck = [s.model for s, n in leaving if s.state is State.STOP_FAILED and s.stops == n]
        if stuck:
            raise BackendError(f"cannot start while {', '.join(stuck)} could not be stopped", model)

    async def _ready(self, slot: Slot, container: Container) -> None:
        await self._mark_ready(slot, container)
        self.metrics.starts.labels(slot.model, "ready").inc()
        assert slot.start is not None
        slot.start.set_result(None)

    async def _mark_ready(self, slot: Slot, container: Container) -> None:
        async with self.changed:
            slot.state, slot.container = State.READY, container
            slot.ready_since = slot.last_used = self.clock()
            self.changed.notify_all()

    async def _start_failed(self, slot: Slot, error: BaseException) -> None:
        failure = error if isinstance(error, SwapctlError) else StartError(slot.model, repr(error))
        if isinstance(error, StopFailed) and error.model == slot.model:
            await self._stuck(slot)  # its own unhealthy container would not stop
        else:
            await self._stopped(slot)
        log.error("%s", failure)
        self.metrics.starts.labels(slot.model, "failed").inc()
        assert slot.start is not None
        slot.start.set_exception(failure)

    # --- containers -----------------------------------------------------------------------

    async def _start(self, slot: Slot) -> Container:
        spec = build_spec(self.config, slot.model)
        log.info("starting %s (%s)", slot.model, spec.image)
        slot.container = await asyncio.to_thread(self.backend.start, spec)
        return await self._until_healthy(slot, slot.container)

    async def _until_healthy(self, slot: Slot, container: Container) -> Container:
        """Wait for its health check; on failure remove the container, or say it would not stop."""
        model = self.config.models[slot.model]
        timeout = model.health_check_timeout or self.config.health_check_timeout
        try:
            return await self._wait_healthy(slot.model, container, model.health, timeout)
        except BaseException:
            await self._remove(slot.model, container, 0)
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

    async def _remove(self, model: str, container: Container, grace: float) -> None:
        """Stop gracefully, else kill; StopFailed only while the container still runs."""
        try:
            await asyncio.to_thread(self.backend.stop, container.id, grace)
            return
        except Exception as error:
            log.warning("%s: stopping %s failed (%s); killing it", model, container.name, error)
        try:
            await asyncio.to_thread(self.backend.stop, container.id, 0)
            return
        except Exception as error:
            current = await asyncio.to_thread(self.backend.get, container.id)
            if current is None or not current.running:
                return  # dead; the upkeep check removes its remains
            raise StopFailed(f"its container {container.name} could not be stopped: {error}", model) from None

    async def _evict(self, slot: Slot, patience: float | None = None) -> None:
        """Stop the model once its requests in flight finish, or after `patience` seconds
        regardless of them (a start under way always finishes first)."""
        settled = (State.READY, State.STOPPED, State.STOP_FAILED)
        async with self.changed:
            slot.leaving = True
            try:
                async with asyncio.timeout(patience):
                    await self.changed.wait_for(lambda: slot.state in settled and slot.in_flight == 0)
            except TimeoutError:
                await self.changed.wait_for(lambda: slot.state in settled)
            if slot.state is State.STOPPED or slot.container is None:
                slot.leaving = False
                self.changed.notify_all()
                return
            slot.state = State.STOPPING
            container = slot.container
        self.metrics.evictions.labels(slot.model).inc()
        grace = self.config.models[slot.model].stop_grace_period
        try:
            await self._remove(slot.model, container, grace)
        except BaseException:
            await self._stuck(slot)
            raise
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

    async def _stuck(self, slot: Slot) -> None:
        """Its container would not stop: it keeps counting as running until it is gone."""
        async with self.changed:
            slot.state, slot.leaving = State.STOP_FAILED, False
            self.changed.notify_all()
        log.error("%s: its container %s could not be stopped; it counts as running", slot.model, _name(slot))

    # --- the engine as the database ---------------------------------------------------------

    async def adopt(self) -> list[str]:
        """Take over this instance's containers whose spec and image still match, as far as
        the policy allows them together; stop the rest. Adopted models start as `starting`
        and are ready once their health check answers, as after a start of their own."""
        matching: dict[str, Container] = {}
        for container in await asyncio.to_thread(self.backend.list, self.config.instance):
            why = await self._unadoptable(container, matching)
            if why is None:
                matching[container.model] = container
            else:
                log.info("removing %s: %s", container.name, why)
                await self._discard(container)
        allowed = allowed_part(self.config.policy, matching)
        for model, container in matching.items():
            if model not in allowed:
                log.info("stopping %s: the policy does not allow it beside %s", model, ", ".join(allowed))
                await self._discard(container)
        for model in allowed:
            await self._take_over(self.slots[model], matching[model])
        return list(allowed)

    async def _take_over(self, slot: Slot, container: Container) -> None:
        """Ready at once if its health check answers now; else `starting`, as after a start of
        its own (it may still be loading), with its healthCheckTimeout."""
        path = self.config.models[slot.model].health
        if path == "none" or await self._healthy(container.url + path):
            await self._mark_ready(slot, container)
            log.info("adopted %s (%s)", slot.model, container.name)
            return
        slot.container = container
        log.info("adopting %s (%s): waiting for its health check", slot.model, container.name)
        self._launch(slot, self._resume(slot, container))

    async def _unadoptable(self, container: Container, adopted: Mapping[str, Container]) -> str | None:
        """Why `container` cannot be adopted; None when it can."""
        if container.model not in self.slots or container.model in adopted:
            return "left over"
        if not container.running:
            return container.state
        if container.host_port is None:
            return "it publishes no port"
        spec = build_spec(self.config, container.model)
        image = await asyncio.to_thread(self.backend.image_id, spec.image)
        if container.spec_hash != spec.spec_hash or (image is not None and container.image_id != image):
            return "its spec or image changed"  # an image may be rebuilt under its name
        return None

    async def _discard(self, container: Container) -> None:
        """Remove a container found at start-up; one that would not stop counts as running."""
        try:
            await self._remove(container.model, container, self._grace(container.model))
        except StopFailed:
            slot = self.slots.get(container.model)
            if slot is None or slot.container is not None:
                raise  # nothing could keep counting it
            slot.container = container
            await self._stuck(slot)

    async def _resume(self, slot: Slot, container: Container) -> None:
        """An adopted container: ready once healthy, as if it had just started (it may be loading)."""
        began = time.monotonic()
        try:
            healthy = await self._until_healthy(slot, container)
        except BaseException as error:
            await self._start_failed(slot, error)
            if not isinstance(error, Exception):
                raise
            return
        await self._ready(slot, healthy)
        log.info("adopted %s (%s), healthy after %.3fs", slot.model, container.name, time.monotonic() - began)

    def _grace(self, model: str) -> float:
        found = self.config.models.get(model)
        return found.stop_grace_period if found else DEFAULT_GRACE

    async def check(self) -> None:
        """The upkeep duties: crashed containers, idle models past their ttl, containers that
        would not stop, and remains of dead ones."""
        present = {c.id: c for c in await asyncio.to_thread(self.backend.list, self.config.instance)}
        await self._check_crashes(present)
        await self._check_ttl()
        await self._retry_stuck()
        await self._remove_remains(present)

    async def _check_crashes(self, present: Mapping[str, Container]) -> None:
        for slot in self.slots.values():
            if slot.state is State.READY and not slot.leaving and slot.container is not None:
                current = present.get(slot.container.id)
                if current is None or not current.running:
                    await self.mark_crashed(slot)

    async def _check_ttl(self) -> None:
        now = self.clock()
        for slot in self.slots.values():
            ttl = self.config.models[slot.model].ttl or self.config.global_ttl
            idle = slot.state is State.READY and not slot.leaving and slot.in_flight == 0
            if ttl and idle and now - slot.last_used >= ttl:
                log.info("ttl: %s idle for %.0fs", slot.model, now - slot.last_used)
                await self._evict(slot)

    async def _retry_stuck(self) -> None:
        for slot in self.slots.values():
            if slot.state is State.STOP_FAILED and not slot.leaving:
                with contextlib.suppress(StopFailed):  # said by _stuck; tried again next time
                    await self._evict(slot)

    async def _remove_remains(self, present: Mapping[str, Container]) -> None:
        """Remains that could not be removed earlier (say, while the daemon was down)."""
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

    async def unload(self, model: str | None = None, timeout: float | None = None) -> list[str]:
        """Stop one model or all, once their requests in flight finish, or after `timeout`
        seconds regardless of them. The models that were running."""
        targets = [self.slots[model]] if model else list(self.slots.values())
        busy = [s for s in targets if s.state is not State.STOPPED]
        await asyncio.gather(*(self._evict(s, timeout) for s in busy))
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


def _name(slot: Slot) -> str:
    return slot.container.name if slot.container else "-"
