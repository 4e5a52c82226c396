"""The swapper: decide with the policy, apply through the backend.

Requests for a starting model join that start. A model chosen for eviction is leaving: it
admits no new request, finishes the ones in flight, then stops; only then does the model
that evicted it start. Decisions are taken with no await between deciding and marking, so
swaps run as tasks and swaps of disjoint models overlap.

A start whose image may need a pull (pull_policy `always`, or an image not in `images`, those
seen on the machine) takes its image first and decides only then: while it pulls, nothing is
decided nor evicted for it, so a pull that fails (or a long one) costs nothing that runs.
Meanwhile it counts as running for other decisions (a container that does not exist yet is
counted, never the reverse); one that evicts it ends its start, stopped, once the pull is over.
Only an image removed behind swapctl's back since it was seen is pulled after the evictions.

The matrix is an invariant: a container counts as running for every decision until it is
gone. One that could not be stopped (nor killed) is stop-failed, not stopped; the upkeep
check and the next eviction try again. Containers found at start-up are adopted only as far
as the policy allows them together, and only once their health check answers.

A reload swaps `config` between two decisions. Models whose container changed, models
removed, and models the new policy forbids beside the rest are evicted the usual way (their
requests in flight finish first); a removed model's slot goes once it has stopped, and until
then it runs under `retiring`, the last config that named it.

With a GPU inventory, each model's footprint (what its container holds on each GPU) is measured
once it is ready, in a task of its own; a start that evicted models waits, after they stopped,
until the inventory shows their memory back (bounded: see `GpuMemory`). A model asking for a
count of GPUs then gets the devices with the most free memory, fixed in its container (see
`placement`): free as the inventory shows it, else as declared less the running footprints.

A model with vLLM's `sleep` level, evicted to make room, is put to sleep instead of stopped
(see `SleepMode`): its container runs on, counted as stopped by decisions. A request for it is
decided as a start, then wakes that container; a sleep that fails stops it, a wake that fails
starts a new container. Unload, ttl, a reload that retires it and crashes stop it for real.

Each start's own duration (its container's start to ready, the stops it waited for left out)
and each measured footprint are kept in `measures`, a file per instance that outlives the
process; decisions take the costs of `evict_costs: auto` models from it (`policy()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any

import httpx

from swapctl.backend import AsyncBackend, Backend, Container, PullTally
from swapctl.backend.progress import sizes
from swapctl.config import Config
from swapctl.errors import (
    BackendError,
    Busy,
    ImageMissing,
    PullFailed,
    StartError,
    StopFailed,
    SwapctlError,
    UnknownModelError,
)
from swapctl.gpus import Inventory
from swapctl.lifecycle import placement
from swapctl.lifecycle.activity import Activity, Row, Swap
from swapctl.lifecycle.changes import Changes, keep_fixed
from swapctl.lifecycle.gpu_memory import RELEASE_WAIT, GpuMemory
from swapctl.lifecycle.health import Clock, HealthCheck
from swapctl.lifecycle.lease import Lease, Ticket
from swapctl.lifecycle.sleep_mode import NotDone, SleepMode
from swapctl.lifecycle.slot import ModelStatus, Progress, Slot, State, Step
from swapctl.matrix import Decision, Policy, allowed_part
from swapctl.measures import MeasureStore, costed_policy
from swapctl.metrics import Metrics
from swapctl.spec import ContainerSpec, build_spec

log = logging.getLogger("swapctl")
SETTLED = (State.READY, State.STOPPED, State.STOP_FAILED, State.SLEEPING)  # no start or stop under way


@dataclass(frozen=True)
class Decided:
    """A start's decision as taken: the policy's answer, the models another swap was already
    evicting (each with its count of stops then), and the seconds the policy took."""

    decision: Decision
    leaving: tuple[tuple[Slot, int], ...]
    seconds: float


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
        self.activity = Activity(self.row, clock)  # what people and tools watch: swaps, rates, events
        statuses = lambda: [(s.model, s.state, s.in_flight) for s in self.status()]  # noqa: E731
        self.metrics.watch(statuses, [state.value for state in State])

    # --- requests -------------------------------------------------------------------------

    async def acquire(self, model: str) -> Lease:
        """Wait until `model` is ready; the lease counts one request in flight on it."""
        return await (await self.admit(model)).lease()

    async def admit(self, model: str) -> Ticket:
        """Count one request in flight on `model`, starting it if it is stopped (after waiting
        for a stop under way), or refuse it now (busy, stop-failed, unknown). The wait for
        the start is the ticket's `lease()`."""
        async with self.changed:
            slot = self._slot(model)
            while slot.leaving or slot.phase is State.STOPPING:
                await self.changed.wait()
                slot = self._slot(model)  # a reload may have removed it meanwhile
            if slot.phase is State.STOP_FAILED:
                raise StopFailed(f"its old container {_name(slot)} could not be stopped yet", model)
            limit = self.config.models[model].concurrency_limit
            if slot.in_flight >= limit:
                raise Busy(model, limit)
            slot.in_flight += 1
            self.activity.touched(model)
            if slot.phase in (State.STOPPED, State.SLEEPING):
                self._claim(slot)
            ready = slot.container if slot.phase is State.READY else None
        return Ticket(model, ready, lambda: self._join(slot), lambda: self._release(slot))

    async def _join(self, slot: Slot) -> Container:
        """The container of an admitted request's model, once ready."""
        if slot.phase is not State.READY:
            assert slot.start is not None
            await asyncio.shield(slot.start)  # join the start; leaving it leaves the start alone
        if slot.container is None:
            raise BackendError("its container stopped as it became ready", slot.model)
        return slot.container

    async def _release(self, slot: Slot) -> None:
        async with self.changed:
            slot.in_flight -= 1
            slot.last_used = self.clock()
            self.activity.touched(slot.model)
            self.changed.notify_all()

    def running(self) -> list[str]:
        return sorted(m for m, s in self.slots.items() if s.running)

    def _slot(self, model: str) -> Slot:
        """The slot of a configured model: one a reload removed is unknown at once."""
        slot = self.slots.get(model)
        if slot is None or model not in self.config.models:
            raise UnknownModelError(model)
        return slot

    def _config_for(self, model: str) -> Config:
        """The config `model` runs under: the current one, or, for a model a reload removed
        that has yet to stop, the last one that named it."""
        return self.config if model in self.config.models else self.retiring[model]

    def _claim(self, slot: Slot) -> None:
        """Start a stopped (or wake a sleeping) model, the lock held: decide now, or, if its
        image may need a pull, once the image is here."""
        model = self.config.models[slot.model]
        pull_first = slot.container is None and (
            model.pull_policy == "always" or model.image not in self.images
        )
        if slot.container is None:  # a new container: where the last one ran does not bind it
            self.placed.pop(slot.model, None)
        self._launch(slot, State.PULLING if pull_first else State.STARTING)
        try:
            decided = None if pull_first else self._decide(slot)
        except Exception as error:  # a policy that cannot decide fails this start, nothing else
            self._move(slot, owner=self._spawn(self._start_failed(slot, error)))
            return
        self._move(slot, owner=self._spawn(self._swap(slot, decided)))

    def _decide(self, slot: Slot) -> Decided:
        """Decide and mark, with no await in between: the next decision sees this one. The
        model, starting already, is not among the running it is decided against."""
        began = time.perf_counter()
        running = [m for m in self.running() if m != slot.model]
        decision = self.policy().decide(slot.model, running)
        seconds = time.perf_counter() - began
        if decision.devices is not None and slot.container is None:  # held now: the next decision sees it
            self.placed[slot.model] = decision.devices
        keep = set(decision.target_set)
        # a leaving model that holds no container any more is not waited for: claimed again,
        # it decides after this start, and would wait for it
        leaving = tuple(
            (s, s.stops) for s in self.slots.values() if s.leaving and s.holding and s.model not in keep
        )
        for model in decision.evict:
            self._move(self.slots[model], leaving=True)
        evicting = (*decision.evict, *(s.model for s, _ in leaving))
        self._move(slot, step=Step.EVICTING if evicting else Step.STARTING, evicting=evicting)
        return Decided(decision, leaving, seconds)

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

    async def _decide_pulled(self, slot: Slot) -> Decided:
        """The decision of a start whose image is here now. No other decision evicts a model
        while it pulls (it holds nothing); an unload or a reload may have asked it to stop:
        then the start ends, and its move to stopped lets that stop on."""
        async with self.changed:
            if slot.leaving:
                raise BackendError("asked to stop (unload or reload) while its image was pulled", slot.model)
            self._move(slot, State.STARTING)
            return self._decide(slot)

    def _move(self, slot: Slot, phase: State | None = None, **changes: Any) -> None:
        """Every change of state goes through here (the condition's lock held): it wakes
        whoever waits for one."""
        slot.move(phase, now=self.clock(), **changes)
        self.changed.notify_all()
        self.activity.changed(slot.model)

    async def _set(self, slot: Slot, phase: State | None = None, **changes: Any) -> None:
        async with self.changed:
            self._move(slot, phase, **changes)

    def _launch(self, slot: Slot, phase: State, step: Step = Step.PULLING) -> None:
        """The model is pulling or starting: requests wait on `slot.start`, which its task settles."""
        self._move(slot, phase, step=step)
        if self.gpu is not None:
            self.gpu.started(slot.model)
        slot.start = asyncio.get_running_loop().create_future()
        slot.start.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may be waiting

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)
        return task

    # --- starts ---------------------------------------------------------------------------

    async def _swap(self, slot: Slot, decided: Decided | None) -> None:
        """The start: its image then its decision if not decided yet, the evictions, the
        container (or the wake of its sleeping one), its health check. Its duration leaves the
        pull out."""
        began = self.clock()
        asleep = slot.container  # a sleeping model's container, to wake
        try:
            spec = build_spec(self._config_for(slot.model), slot.model)
            if decided is None:
                await self._ensure_image(slot, spec)
                decided = await self._decide_pulled(slot)
                began = self.clock()
            decision = decided.decision
            await asyncio.gather(*(self._evict(self.slots[m], sleep=True) for m in decision.evict))
            await self._until_gone(slot.model, decided.leaving)
            if self.gpu is not None:  # a stopped container's memory may come back late
                others = (s.model for s, _ in decided.leaving)
                await self.gpu.until_freed(slot.model, (*decision.evict, *others))
            if asleep is None:
                container, woke = await self._start(slot, await self._place(spec, decision.devices)), None
            else:
                container, woke = await self._wake(slot, spec, asleep, decision.devices)
        except BaseException as error:
            await self._start_failed(slot, error)
            self._record(slot, decided.decision if decided else None, self.clock() - began, error)
            if not isinstance(error, Exception):
                raise
            return
        took = self.clock() - began
        if woke is not None:
            await self._awake(slot, container, decided, took, woke)
            return
        slot.durations.append(took)  # before the model is ready: whoever it wakes sees it
        await self._ready(slot, container)
        self._record(slot, decision, took)
        self.metrics.start_seconds.labels(slot.model).observe(took)
        log.info(
            "swap: %s ready in %.3fs (set %s, evicted %s, cost %d, decided in %.0fus)",
            slot.model,
            took,
            decision.set or "-",
            ", ".join(decision.evict) or "nothing",
            decision.cost,
            decided.seconds * 1e6,
        )

    def _record(
        self, slot: Slot, decision: Decision | None, took: float, error: BaseException | None = None
    ) -> None:
        """The swap into the activity record, ready or failed (undecided: its image failed)."""
        failure = None if error is None else str(error) if isinstance(error, SwapctlError) else repr(error)
        swap = Swap(
            self.activity.wall(),
            slot.model,
            decision.set if decision else None,
            decision.evict if decision else (),
            decision.cost if decision else 0,
            took,
            ok=error is None,
            error=failure,
        )
        self.activity.swapped(swap)

    async def _place(self, spec: ContainerSpec, decided: tuple[int, ...] | None = None) -> ContainerSpec:
        """A count of GPUs fixed on the devices the decision placed the model on (fit mode),
        else on those with the most free memory now, after the evictions (see `placement`);
        the spec as written where nothing says what is free."""
        self.placed.pop(spec.model, None)
        wanted = placement.ask(spec)
        chosen = tuple(d for d in decided or () if wanted is not None and d not in wanted.pinned)
        if wanted is not None and decided is not None and len(chosen) == wanted.count:
            self.placed[spec.model] = chosen
            log.info(
                "placing %s on GPU %s (the decision's placement)", spec.model, ", ".join(map(str, chosen))
            )
            return placement.place(spec, chosen)
        free = await self._free_memory(spec.model) if wanted is not None else None
        devices = placement.choose(free, wanted) if wanted is not None and free is not None else None
        if devices is None or free is None:
            return spec
        self.placed[spec.model] = devices
        log.info(placement.placing_line(spec.model, devices, free))
        return placement.place(spec, devices)

    async def _free_memory(self, model: str) -> dict[int, int] | None:
        """Each GPU's free bytes: as the driver reports them (less the `vram` of models placed
        but not measured yet: they may not have allocated), else as declared less the `vram`
        of the other models holding GPUs; None where neither is known."""
        snapshot = await self.gpu.snapshot() if self.gpu is not None else None
        config = self._config_for(model)
        if snapshot is not None:
            unmeasured = {
                m: placement.devices_of(config.footprints.get(m), self.placed.get(m))
                for m, s in self.slots.items()
                if m != model and s.running and not self._measured_now(m, s)
            }
            return placement.less_declared(placement.measured_free(snapshot), config.footprints, unmeasured)
        if config.gpu_memory is None:
            return None
        holding = [m for m, s in self.slots.items() if (s.running or s.leaving) and m != model]
        footprints = config.footprints
        running = {m: placement.devices_of(footprints.get(m), self.placed.get(m)) for m in holding}
        return placement.declared_free(config.gpu_memory, footprints, running)

    def _measured_now(self, model: str, slot: Slot) -> bool:
        """Whether the footprint of the model's current container has been measured."""
        measured = self.gpu.footprints.get(model) if self.gpu is not None else None
        return measured is not None and slot.container is not None and measured.container == slot.container.id

    async def _until_gone(self, model: str, leaving: tuple[tuple[Slot, int], ...]) -> None:
        """Wait for models another swap is evicting. Each has stopped once since the decision;
        one claimed again since then was decided with this model counted as running, so it
        waits for us, not we for it. One whose stop failed still runs: this start fails."""
        gone = (State.STOPPED, State.STOP_FAILED, State.SLEEPING)
        async with self.changed:
            await self.changed.wait_for(lambda: all(s.phase in gone or s.stops != n for s, n in leaving))
        stuck = [s.model for s, n in leaving if s.phase is State.STOP_FAILED and s.stops == n]
        if stuck:
            raise BackendError(f"cannot start while {', '.join(stuck)} could not be stopped", model)

    async def _start(self, slot: Slot, spec: ContainerSpec) -> Container:
        log.info("starting %s (%s)", slot.model, spec.image)
        await self._set(slot, step=Step.STARTING)
        began = self.clock()  # its own start, kept as a measure: the stops it waited for are others'
        try:
            container = await self.backend.start(spec)
        except ImageMissing:  # removed since it was seen: late, as its pull_policy says
            self.images.discard(spec.image)
            await self._ensure_image(slot, spec)
            await self._set(slot, step=Step.STARTING)
            began = self.clock()
            container = await self.backend.start(spec)
        self.images.add(spec.image)
        await self._set(slot, container=container, step=Step.LOADING)
        healthy = await self._until_healthy(slot, container)
        self.measures.record_start(slot.model, spec.spec_hash, self.clock() - began)
        return healthy

    async def _ensure_image(self, slot: Slot, spec: ContainerSpec) -> None:
        """Pull the image as its pull_policy says: when absent (missing), before every start
        (always); absent with never fails the start. The pull is a step of its own, before the
        decision and before the health check's timeout begins."""
        if spec.pull_policy != "always" and await self.backend.image_id(spec.image) is not None:
            self.images.add(spec.image)
            return
        if spec.pull_policy == "never":
            raise ImageMissing(
                f"image '{spec.image}' is not on this machine and its pull_policy is never: "
                f"pull it (swapctl pull {slot.model}) or build it",
                slot.model,
            )
        tally = PullTally(spec.image)
        await self._set(slot, step=Step.PULLING, pulled=tally.pulled)
        log.info("pulling image %s for %s", spec.image, slot.model)
        began = self.clock()
        try:  # each report on the event loop: the bytes so far, for those who wait
            await self.backend.pull(spec.image, lambda report: slot.move(pulled=tally.add(report)))
        except PullFailed as error:
            raise PullFailed(error.message, slot.model) from None
        self.images.add(spec.image)
        took, pulled = self.clock() - began, tally.pulled
        log.info("pulled image %s in %.1fs (%s downloaded)", spec.image, took, sizes(pulled.done))

    async def _until_healthy(self, slot: Slot, container: Container) -> Container:
        """Wait for its health check; on failure remove the container, or say it would not stop."""
        model = self._config_for(slot.model).models[slot.model]
        timeout = model.health_check_timeout
        try:
            return await self.health.wait(slot.model, container, model.health, timeout)
        except BaseException:
            await self._remove(slot.model, container, 0)
            raise

    async def _wake(
        self, slot: Slot, spec: ContainerSpec, asleep: Container, devices: tuple[int, ...] | None
    ) -> tuple[Container, float | None]:
        """Wake the model's sleeping container: it, with the seconds the wake took. One that
        cannot wake, or runs an older spec, is removed and a new one started (seconds None),
        placed as the decision said where it did."""
        await self._set(slot, step=Step.WAKING)
        timeout = self._config_for(slot.model).models[slot.model].health_check_timeout
        began = self.clock()
        if asleep.spec_hash != spec.spec_hash:
            log.info(
                "%s: its sleeping container %s runs an older spec; starting a new one",
                slot.model,
                asleep.name,
            )
        else:
            log.info("waking %s (%s)", slot.model, asleep.name)
            try:
                await self.sleep_mode.wake(asleep, timeout)
                return asleep, self.clock() - began
            except NotDone as error:
                log.warning(
                    "%s: wake failed (%s); stopping its container and starting a new one", slot.model, error
                )
        await self._remove(slot.model, asleep, self._grace(slot.model))
        return await self._start(slot, await self._place(spec, devices)), None

    async def _awake(
        self, slot: Slot, container: Container, decided: Decided, took: float, woke: float
    ) -> None:
        """The woken model is ready: its wake measured (`woke` seconds), the swap recorded."""
        decision = decided.decision
        await self._ready(slot, container, started=False)
        self._record(slot, decision, took)
        self.metrics.wake_seconds.labels(slot.model).observe(woke)
        self.measures.record_wake(slot.model, container.spec_hash, woke)
        log.info(
            "wake: %s awake in %.2fs (set %s, evicted %s, cost %d, swap %.2fs)",
            slot.model,
            woke,
            decision.set or "-",
            ", ".join(decision.evict) or "nothing",
            decision.cost,
            took,
        )

    async def _ready(self, slot: Slot, container: Container, started: bool = True) -> None:
        await self._set(slot, State.READY, container=container)
        if started:  # a container started, not a sleeping one woken
            self.metrics.starts.labels(slot.model, "ready").inc()
        assert slot.start is not None
        slot.start.set_result(None)
        self._measure(slot, container)

    def _measure(self, slot: Slot, container: Container) -> None:
        """Measure what the ready model holds on the GPUs, in a task: nobody waits for it."""
        if self.gpu is not None:
            self._spawn(self._measured(slot, container, self.gpu))

    async def _measured(self, slot: Slot, container: Container, gpu: GpuMemory) -> None:
        found = await gpu.measure(container)
        async with self.changed:
            if found is not None and slot.container is not None and slot.container.id == container.id:
                gpu.footprints[slot.model] = found
                self.measures.record_footprint(slot.model, container.spec_hash, found.memory)
                self.changed.notify_all()
                self.activity.changed(slot.model)

    async def _start_failed(self, slot: Slot, error: BaseException) -> None:
        failure = error if isinstance(error, SwapctlError) else StartError(slot.model, repr(error))
        if isinstance(failure, BackendError) and failure.model is None:  # the engine's, named for the model
            failure = type(failure)(failure.message, slot.model)
        elif getattr(failure, "model", slot.model) != slot.model:  # another model's failure ended this start
            failure = StartError(slot.model, str(failure))
        if isinstance(error, StopFailed) and error.model == slot.model:
            await self._stuck(slot)  # its own unhealthy container would not stop
        else:
            await self._set(slot, State.STOPPED)
        log.error("%s", failure)
        self.metrics.starts.labels(slot.model, "failed").inc()
        assert slot.start is not None
        slot.start.set_exception(failure)

    # --- stops ----------------------------------------------------------------------------

    async def _remove(self, model: str, container: Container, grace: float) -> None:
        """Stop gracefully, else kill; StopFailed only while the container still runs."""
        try:
            await self.backend.stop(container.id, grace)
            return
        except Exception as error:
            log.warning("%s: stopping %s failed (%s); killing it", model, container.name, error)
        try:
            await self.backend.stop(container.id, 0)
            return
        except Exception as error:
            current = await self.backend.get(container.id)
            if current is None or not current.running:
                return  # dead; the upkeep check removes its remains
            raise StopFailed(f"its container {container.name} could not be stopped: {error}", model) from None

    async def _evict(self, slot: Slot, patience: float | None = None, sleep: bool = False) -> None:
        """Stop the model once its requests in flight finish, or after `patience` seconds
        regardless of them (a start under way always finishes first). With `sleep` (to make
        room), a ready model with a sleep level is put to sleep instead, or stopped if it
        cannot; without, a sleeping one is stopped for real."""
        async with self.changed:
            stops = slot.stops  # this tenure: once it is over (stopped by another), so is this eviction
            self._move(slot, leaving=True)
            try:
                async with asyncio.timeout(patience):
                    await self.changed.wait_for(
                        lambda: slot.stops != stops or (slot.phase in SETTLED and slot.in_flight == 0)
                    )
            except TimeoutError:
                await self.changed.wait_for(lambda: slot.stops != stops or slot.phase in SETTLED)
            if slot.stops != stops:
                return
            if slot.phase is State.STOPPED or slot.container is None:
                self._move(slot, leaving=False)
                return
            container = slot.container
            level = self._sleep_level(slot, container) if sleep and slot.phase is State.READY else None
            was_asleep = slot.phase is State.SLEEPING  # its memory is freed already
            self._move(slot, State.STOPPING, owner=asyncio.current_task())
        self.metrics.evictions.labels(slot.model).inc()
        try:
            if level is not None and await self._sleep(slot, container, level):
                return
            if self.gpu is not None and not was_asleep:  # the memory it holds now, to see it come back
                await self.gpu.stopping(slot.model, container)
            await self._remove(slot.model, container, self._grace(slot.model))
        except BaseException:
            await self._stuck(slot)
            raise
        await self._set(slot, State.STOPPED, leaving=False)
        log.info("stopped %s", slot.model)

    def _sleep_level(self, slot: Slot, container: Container) -> int | None:
        """The level to put the evicted model to sleep at: its `sleep`, while the current config
        would run its container as it is; None: stop it."""
        model = self.config.models.get(slot.model)
        if model is None or model.sleep is None:
            return None
        return model.sleep if build_spec(self.config, slot.model).spec_hash == container.spec_hash else None

    async def _sleep(self, slot: Slot, container: Container, level: int) -> bool:
        """Put the stopping model to sleep: True once it sleeps, False (warned) if it must be
        stopped instead."""
        if self.gpu is not None:  # its process stays: only its memory is seen come back
            await self.gpu.stopping(slot.model, container, asleep=True)
        timeout = self.config.models[slot.model].health_check_timeout
        try:
            await self.sleep_mode.sleep(container, level, timeout)
        except NotDone as error:
            log.warning("%s: sleep failed (%s); stopping it instead", slot.model, error)
            return False
        await self._set(slot, State.SLEEPING, leaving=False)
        log.info("sleep: %s asleep at level %d (%s)", slot.model, level, container.name)
        return True

    async def _stuck(self, slot: Slot) -> None:
        """Its container would not stop: it keeps counting as running until it is gone."""
        await self._set(slot, State.STOP_FAILED, leaving=False)
        log.error("%s: its container %s could not be stopped; it counts as running", slot.model, _name(slot))

    async def mark_crashed(self, slot: Slot) -> bool:
        """The container died: remove its remains; the model is stopped. False if already handled."""
        async with self.changed:
            if slot.phase not in (State.READY, State.SLEEPING) or slot.container is None:
                return False
            container = slot.container
            self._move(slot, State.STOPPING, owner=asyncio.current_task())
        log.warning("%s: its container %s stopped unexpectedly", slot.model, container.name)
        self.metrics.crashes.labels(slot.model).inc()
        try:
            await self.backend.stop(container.id, 0)
        except BackendError as error:
            log.warning("could not remove %s: %s", container.name, error)
        finally:
            await self._set(slot, State.STOPPED)
        return True

    async def confirm_alive(self, lease: Lease) -> bool:
        """After a failed forward: False (and the model stopped) if its container is gone."""
        slot = self.slots.get(lease.model)
        if slot is None or slot.container is None or slot.container.id != lease.container.id:
            return False
        current = await self.backend.get(lease.container.id)
        if current is None or not current.running:
            await self.mark_crashed(slot)
            return False
        return True

    async def unload(self, model: str | None = None, timeout: float | None = None) -> list[str]:
        """Stop one model or all, once their requests in flight finish, or after `timeout`
        seconds regardless of them. The models that were running."""
        targets = [self._slot(model)] if model else list(self.slots.values())
        busy = [s for s in targets if s.phase is not State.STOPPED]
        await asyncio.gather(*(self._evict(s, timeout) for s in busy))
        return [s.model for s in busy]

    # --- reload -----------------------------------------------------------------------------

    async def reload(self, config: Config) -> Changes:
        """Take `config` from the next decision on. Models whose container spec and image are
        unchanged keep running untouched; changed and removed ones, and those the new policy
        forbids beside the rest (the cheapest to lose), are evicted as a swap evicts: their
        requests in flight finish first, and a changed model's next request starts its new
        spec. The keys a running proxy cannot change keep their old value (`needs_restart`)."""
        images = await self._image_ids(config)
        async with self.changed:  # no await from here on: every decision sees one config whole
            config, needs_restart = keep_fixed(self.config, config)
            old, self.config = self.config, config
            added = tuple(m for m in config.models if m not in old.models)
            removed = tuple(m for m in old.models if m not in config.models)
            kept = [m for m in config.models if m in old.models]
            replaced = tuple(m for m in kept if self._outdated(m, old, images))
            self._take(old, removed)
            for model in (*removed, *replaced):
                self._retire(self.slots[model])
            forbidden = self._enforce(self.policy())
        unchanged = tuple(m for m in kept if m not in replaced)
        changes = Changes(added, removed, replaced, unchanged, forbidden, needs_restart)
        self.activity.reloaded(changes.to_json())
        for model in added:
            self.activity.changed(model)
        return changes

    async def _image_ids(self, config: Config) -> dict[str, str | None]:
        """The ID each image of a model that has a container has now, so that an image rebuilt
        under its name counts as a change (as at adoption); None where the engine cannot say."""
        names = {config.models[m].image for m, s in self.slots.items() if s.container and m in config.models}
        ids: dict[str, str | None] = {}
        for name in sorted(names):
            try:
                ids[name] = await self.backend.image_id(name)
            except BackendError:
                ids[name] = None
        return ids

    def _outdated(self, model: str, old: Config, images: Mapping[str, str | None]) -> bool:
        """Whether what `model` runs (its container, else what `old` would start) differs from
        what the current config starts: another spec hash, or an image rebuilt under its name."""
        spec = build_spec(self.config, model)
        container = self.slots[model].container
        if container is None:
            return build_spec(old, model).spec_hash != spec.spec_hash
        image = images.get(spec.image)
        return container.spec_hash != spec.spec_hash or (image is not None and container.image_id != image)

    def _take(self, old: Config, removed: tuple[str, ...]) -> None:
        """Slots for the added models (one a reload removed and that still drains keeps its
        own); the removed ones run under `old` until they are gone."""
        for model in removed:
            self.retiring[model] = old
        for model in self.config.models:
            self.retiring.pop(model, None)
            if model not in self.slots:
                self.slots[model] = Slot(model)

    def _enforce(self, policy: Policy) -> tuple[str, ...]:
        """Evict what the policy does not allow together, keeping the costliest to lose (as
        adoption does); the models evicted."""
        running = [m for m, s in self.slots.items() if s.running and m in self.config.models]
        forbidden = tuple(sorted(set(running) - set(allowed_part(policy, running))))
        for model in forbidden:
            log.info("reload: stopping %s: the new policy does not allow it beside the rest", model)
            self._retire(self.slots[model])
        return forbidden

    def _retire(self, slot: Slot) -> None:
        """Evict `slot` in a task, as a swap does (its lock held): leaving from now on, it
        admits no new request and stops once those in flight finish."""
        if slot.phase is State.STOPPED:
            self._forget(slot)
            return
        self._move(slot, leaving=True)
        self._spawn(self._retired(slot, slot.stops))

    async def _retired(self, slot: Slot, stops: int) -> None:
        try:
            # else another eviction stopped it since, and it may be new; asleep, it still runs
            if slot.stops == stops or slot.phase is State.SLEEPING:
                await self._evict(slot)
        except SwapctlError as error:  # a failed stop is logged and tried again by the upkeep
            log.warning("reload: stopping %s: %s", slot.model, error)
        async with self.changed:
            self._forget(slot)

    def _forget(self, slot: Slot) -> None:
        """Drop the slot of a model no config names any more, once it is stopped and idle
        (its lock held): it leaves /running and the metrics' gauges."""
        model = slot.model
        idle = slot.phase is State.STOPPED and not slot.leaving and not slot.in_flight
        if idle and model not in self.config.models and self.slots.get(model) is slot:
            del self.slots[model]
            self.retiring.pop(model, None)
            self.changed.notify_all()  # requests waiting for it learn that it is gone
            self.activity.removed(model)

    # --- the engine as the database ---------------------------------------------------------

    async def adopt(self) -> list[str]:
        """Take over this instance's containers whose spec and image still match, as far as
        the policy allows them together; stop the rest."""
        matching: dict[str, Container] = {}
        for container in await self.backend.list(self.config.instance):
            why = await self._unadoptable(container, matching)
            if why is None:
                matching[container.model] = container
                self.images.add(self.config.models[container.model].image)
            else:
                log.info("removing %s: %s", container.name, why)
                await self._discard(container)
        for model, container in list(matching.items()):
            if self.config.models[model].sleep is not None and await self.sleep_mode.asleep(container):
                del matching[model]  # counted as stopped, as when it fell asleep here
                await self._set(self.slots[model], State.SLEEPING, container=container)
                log.info("adopted %s (%s), asleep", model, container.name)
        allowed = allowed_part(self.policy(), matching)
        for model, container in matching.items():
            if model not in allowed:
                log.info("stopping %s: the policy does not allow it beside %s", model, ", ".join(allowed))
                await self._discard(container)
        for model in allowed:
            self.placed[model] = tuple(int(i) for i in matching[model].placed if i.isdigit())
            await self._take_over(self.slots[model], matching[model])
        return list(allowed)

    async def _unadoptable(self, container: Container, adopted: Mapping[str, Container]) -> str | None:
        """Why `container` cannot be adopted; None when it can."""
        if container.model not in self.slots or container.model in adopted:
            return "left over"
        if not container.running:
            return container.state
        if container.host_port is None:
            return "it publishes no port"
        spec = build_spec(self.config, container.model)
        image = await self.backend.image_id(spec.image)
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
            await self._set(slot, container=container)
            await self._stuck(slot)

    async def _take_over(self, slot: Slot, container: Container) -> None:
        """Ready at once if its health check answers now; else starting, as after a start of
        its own (it may still be loading), with its healthCheckTimeout."""
        if await self.health.answers(container, self.config.models[slot.model].health):
            await self._set(slot, State.READY, container=container)
            log.info("adopted %s (%s)", slot.model, container.name)
            self._measure(slot, container)
            return
        log.info("adopting %s (%s): waiting for its health check", slot.model, container.name)
        async with self.changed:
            self._launch(slot, State.STARTING, Step.LOADING)
            self._move(slot, container=container, owner=self._spawn(self._resume(slot, container)))

    async def _resume(self, slot: Slot, container: Container) -> None:
        began = self.clock()
        try:
            healthy = await self._until_healthy(slot, container)
        except BaseException as error:
            await self._start_failed(slot, error)
            if not isinstance(error, Exception):
                raise
            return
        await self._ready(slot, healthy)
        log.info("adopted %s (%s), healthy after %.3fs", slot.model, container.name, self.clock() - began)

    def _grace(self, model: str) -> float:
        """Its stop grace period; the default for a leftover of a model no config names."""
        config = self.config if model in self.config.models else self.retiring.get(model, self.config)
        return config.stop_grace(model)

    # --- upkeep -----------------------------------------------------------------------------

    async def upkeep(self, interval: float) -> None:
        """Run `check` every `interval` seconds, for as long as the proxy serves."""
        while True:
            await self.health.clock.sleep(interval)
            try:
                await self.check()
            except SwapctlError as error:
                log.warning("checking containers: %s", error)

    async def check(self) -> None:
        """The upkeep duties: crashed containers, idle models past their ttl, containers that
        would not stop, and remains of dead ones."""
        present = {c.id: c for c in await self.backend.list(self.config.instance)}
        await self._check_crashes(present)
        await self._check_ttl()
        await self._retry_stuck()
        await self._remove_remains(present)
        async with self.changed:
            for slot in list(self.slots.values()):
                self._forget(slot)  # removed by a reload, and stopped since

    async def _check_crashes(self, present: Mapping[str, Container]) -> None:
        for slot in list(self.slots.values()):  # a reload may add or drop slots meanwhile
            if slot.state in (State.READY, State.SLEEPING) and slot.container is not None:
                current = present.get(slot.container.id)
                if current is None or not current.running:
                    await self.mark_crashed(slot)

    async def _check_ttl(self) -> None:
        now = self.clock()
        for slot in list(self.slots.values()):
            if slot.state not in (State.READY, State.SLEEPING) or slot.in_flight:
                continue  # asleep past its ttl: stopped for real
            ttl = self._config_for(slot.model).models[slot.model].ttl
            if ttl and now - slot.last_used >= ttl:
                log.info("ttl: %s idle for %.0fs", slot.model, now - slot.last_used)
                await self._evict(slot)

    async def _retry_stuck(self) -> None:
        for slot in list(self.slots.values()):
            if slot.state is State.STOP_FAILED and not slot.leaving:
                with contextlib.suppress(StopFailed):  # said by _stuck; tried again next time
                    await self._evict(slot)

    async def _remove_remains(self, present: Mapping[str, Container]) -> None:
        """Remains that could not be removed earlier (say, while the daemon was down)."""
        tracked = {s.container.id for s in self.slots.values() if s.container is not None}
        for container in present.values():
            owner = self.slots.get(container.model)
            if container.id in tracked or container.running or (owner and owner.phase is not State.STOPPED):
                continue
            log.info("removing %s: %s", container.name, container.state)
            await self.backend.stop(container.id, 0)

    async def preload(self) -> None:
        """Start the configured models one by one, as requests would: the matrix still decides."""
        for model in self.config.preload:
            try:
                await (await self.acquire(model)).release()
            except SwapctlError as error:
                log.error("preload: %s", error)

    # --- what people see --------------------------------------------------------------------

    def status(self) -> list[ModelStatus]:
        now = self.clock()
        return [self._status(slot, now) for slot in self.slots.values()]

    def _status(self, slot: Slot, now: float) -> ModelStatus:
        measured = self.gpu.footprints.get(slot.model) if self.gpu else None
        return ModelStatus.of(
            slot, now, measured.to_json() if measured else None, self.placed.get(slot.model)
        )

    def row(self, model: str) -> Row | None:
        """The model's row for people: its status, its last start's duration, its rates."""
        slot = self.slots.get(model)
        if slot is None:
            return None
        last_start = slot.durations[-1] if slot.durations else None
        return self.activity.with_rates(self._status(slot, self.clock()), last_start)

    def rows(self) -> list[Row]:
        return [row for model in list(self.slots) if (row := self.row(model)) is not None]

    def plan(self, model: str) -> Decision:
        """What a request for `model` would decide now, changing nothing."""
        self._slot(model)
        return self.policy().decide(model, self.running())

    def progress(self, model: str) -> Progress | None:
        """How far the start of `model` has come; None unless it is starting."""
        slot = self.slots.get(model)
        progress = Progress.of(slot, self.clock()) if slot is not None else None
        before_wake = (Step.PULLING, Step.EVICTING, Step.WAKING)
        if progress is None or slot is None or slot.container is None or progress.step not in before_wake:
            return progress
        measured = self.measures.get(model, slot.container.spec_hash)  # a sleeping one, woken
        return replace(progress, waking=True, last_starts=measured.wakes if measured else ())

    def last_starts(self, model: str) -> tuple[float, ...]:
        """The durations of its last measured starts, in seconds, oldest first."""
        slot = self.slots.get(model)
        return tuple(slot.durations) if slot is not None else ()

    def container(self, model: str) -> Container | None:
        """The container the model runs now (or is starting), if any."""
        return self._slot(model).container

    async def logs(self, model: str, tail: int) -> str:
        """The last lines of the model's container: the one it runs, else any left of it."""
        found = self._slot(model).container or next(
            (c for c in await self.backend.list(self.config.instance) if c.model == model), None
        )
        return await self.backend.logs(found.id, tail) if found else ""


def _name(slot: Slot) -> str:
    return slot.container.name if slot.container else "-"
