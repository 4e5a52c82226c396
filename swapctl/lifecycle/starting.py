"""Starting: claiming a model for a request, deciding what it evicts, its image, the
evictions, its container (or the wake of its sleeping one) and its health check.

A start is one task (`_swap`), which owns the model from its claim until it is ready or
stopped: requests join it by awaiting `slot.start`, which the task always settles, and one
leaving never cancels it for the others. A start whose image may need a pull decides only
once the image is here (pulling: nothing held, nothing evicted for it, counted by no
decision). A decision waits only for models decided before it: those it evicts (running
when it decided) and those another swap was already evicting that still hold a container,
each until the tenure it saw is over. So waits never form a cycle.

With a GPU inventory, a start that evicted models also waits (bounded) until their memory is
back, and a ready model's footprint is measured in a task of its own (`GpuMemory`). A
sleeping model is decided as a start, then woken in its container; a wake that fails
starts a new one. Each start's own duration (the stops it waited for left out) and each
wake are kept in `measures`, which decisions read for `evict_costs: auto`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from swapctl.backend import Container
from swapctl.errors import BackendError, ImageMissing, StartError, StopFailed, SwapctlError
from swapctl.lifecycle.activity import Swap
from swapctl.lifecycle.board import Board, outdated
from swapctl.lifecycle.gpu_memory import GpuMemory
from swapctl.lifecycle.placing import Placer
from swapctl.lifecycle.pulling import Pulls
from swapctl.lifecycle.sleep_mode import NotDone
from swapctl.lifecycle.slot import RESTING, Slot, State, Step
from swapctl.lifecycle.stopping import Stops
from swapctl.matrix import Decision
from swapctl.spec import ContainerSpec, build_spec

log = logging.getLogger("swapctl")


@dataclass(frozen=True)
class Decided:
    """A start's decision as taken: the policy's answer, the models another swap was already
    evicting (each with its count of stops then), and the seconds the policy took."""

    decision: Decision
    leaving: tuple[tuple[Slot, int], ...]
    seconds: float


class Starts:
    def __init__(self, board: Board, stops: Stops) -> None:
        self.board, self.stops = board, stops
        self.pulls, self.placer = Pulls(board), Placer(board)

    def claim(self, slot: Slot) -> None:
        """Start a stopped (or wake a sleeping) model, the lock held: decide now, or, if its
        image may need a pull, once the image is here."""
        model = self.board.config.models[slot.model]
        pull_first = slot.container is None and (
            model.pull_policy == "always" or model.image not in self.board.images
        )
        if slot.container is None:  # a new container: where the last one ran does not bind it
            self.board.placed.pop(slot.model, None)
        self.launch(slot, State.PULLING if pull_first else State.STARTING)
        try:
            decided = None if pull_first else self._decide(slot)
        except Exception as error:  # a policy that cannot decide fails this start, nothing else
            self.board.move(slot, owner=self.board.spawn(self.start_failed(slot, error)))
            return
        self.board.move(slot, owner=self.board.spawn(self._swap(slot, decided)))

    def _decide(self, slot: Slot) -> Decided:
        """Decide and mark, with no await in between: the next decision sees this one. The
        model, starting already, is not among the running it is decided against."""
        began = time.perf_counter()
        running = [m for m in self.board.running() if m != slot.model]
        decision = self.board.policy().decide(slot.model, running)
        seconds = time.perf_counter() - began
        if decision.devices is not None and slot.container is None:  # held now: the next decision sees it
            self.board.placed[slot.model] = decision.devices
        keep = set(decision.target_set)
        # a leaving model that holds no container any more is not waited for: claimed again,
        # it decides after this start, and would wait for it
        leaving = tuple(
            (s, s.stops) for s in self.board.slots.values() if s.leaving and s.holding and s.model not in keep
        )
        for model in decision.evict:
            self.board.move(self.board.slots[model], leaving=True)
        evicting = (*decision.evict, *(s.model for s, _ in leaving))
        self.board.move(slot, step=Step.EVICTING if evicting else Step.STARTING, evicting=evicting)
        return Decided(decision, leaving, seconds)

    async def _decide_pulled(self, slot: Slot) -> Decided:
        """The decision of a start whose image is here now. No other decision evicts a model
        while it pulls (it holds nothing); an unload or a reload may have asked it to stop:
        then the start ends, and its move to stopped lets that stop on."""
        async with self.board.changed:
            if slot.leaving:
                raise BackendError("asked to stop (unload or reload) while its image was pulled", slot.model)
            self.board.move(slot, State.STARTING)
            return self._decide(slot)

    def launch(self, slot: Slot, phase: State, step: Step = Step.PULLING) -> None:
        """The model is pulling or starting: requests wait on `slot.start`, which its task settles."""
        self.board.move(slot, phase, step=step)
        if self.board.gpu is not None:
            self.board.gpu.started(slot.model)
        slot.start = asyncio.get_running_loop().create_future()
        slot.start.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody may be waiting

    async def _swap(self, slot: Slot, decided: Decided | None) -> None:
        """The start: its image then its decision if not decided yet, the evictions, the
        container (or the wake of its sleeping one), its health check. Its duration leaves the
        pull out."""
        began = self.board.clock()
        asleep = slot.container  # a sleeping model's container, to wake
        try:
            spec = build_spec(self.board.config_for(slot.model), slot.model)
            if decided is None:
                await self.pulls.ensure(slot, spec)
                decided = await self._decide_pulled(slot)
                began = self.board.clock()
            decision = decided.decision
            await asyncio.gather(*(self.stops.evict(self.board.slots[m], sleep=True) for m in decision.evict))
            await self._until_gone(slot.model, decided.leaving)
            if self.board.gpu is not None:  # a stopped container's memory may come back late
                others = (s.model for s, _ in decided.leaving)
                await self.board.gpu.until_freed(slot.model, (*decision.evict, *others))
            if asleep is None:
                container, woke = (
                    await self._start(slot, await self.placer.place(spec, decision.devices)),
                    None,
                )
            else:
                container, woke = await self._wake(slot, spec, asleep, decision.devices)
        except BaseException as error:
            await self.start_failed(slot, error)
            self._record(slot, decided.decision if decided else None, self.board.clock() - began, error)
            if not isinstance(error, Exception):
                raise
            return
        took = self.board.clock() - began
        if woke is not None:
            await self._awake(slot, container, decided, took, woke)
            return
        slot.durations.append(took)  # before the model is ready: whoever it wakes sees it
        await self.ready(slot, container)
        self._record(slot, decision, took)
        self.board.metrics.start_seconds.labels(slot.model).observe(took)
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
            self.board.activity.wall(),
            slot.model,
            decision.set if decision else None,
            decision.evict if decision else (),
            decision.cost if decision else 0,
            took,
            ok=error is None,
            error=failure,
        )
        self.board.activity.swapped(swap)

    async def _until_gone(self, model: str, leaving: tuple[tuple[Slot, int], ...]) -> None:
        """Wait for models another swap is evicting. Each has stopped once since the decision;
        one claimed again since then was decided with this model counted as running, so it
        waits for us, not we for it. One whose stop failed still runs: this start fails."""
        async with self.board.changed:
            await self.board.changed.wait_for(
                lambda: all(s.phase in RESTING or s.stops != n for s, n in leaving)
            )
        stuck = [s.model for s, n in leaving if s.phase is State.STOP_FAILED and s.stops == n]
        if stuck:
            raise BackendError(f"cannot start while {', '.join(stuck)} could not be stopped", model)

    async def _start(self, slot: Slot, spec: ContainerSpec) -> Container:
        log.info("starting %s (%s)", slot.model, spec.image)
        await self.board.set(slot, step=Step.STARTING)
        began = self.board.clock()  # its own start, kept as a measure: the stops it waited for are others'
        try:
            container = await self._create(spec)
        except ImageMissing:  # removed since it was seen: late, as its pull_policy says
            self.board.images.discard(spec.image)
            await self.pulls.ensure(slot, spec)
            await self.board.set(slot, step=Step.STARTING)
            began = self.board.clock()
            container = await self._create(spec)
        self.board.images.add(spec.image)
        await self.board.set(slot, container=container, step=Step.LOADING)
        healthy = await self.until_healthy(slot, container)
        self.board.measures.record_start(slot.model, spec.spec_hash, self.board.clock() - began)
        return healthy

    async def _create(self, spec: ContainerSpec) -> Container:
        """The engine's start of the container. One cancelled meanwhile (the watchdog, a
        shutdown) still waits for the engine's answer, the model still counted as starting,
        and removes what it created: nothing is left running untracked."""
        created = asyncio.ensure_future(self.board.backend.start(spec))
        try:
            return await asyncio.shield(created)
        except asyncio.CancelledError:
            while not created.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({created})
            if not created.cancelled() and created.exception() is None:
                await self.stops.remove(spec.model, created.result(), 0)
            raise

    async def until_healthy(self, slot: Slot, container: Container) -> Container:
        """Wait for its health check; on failure remove the container, or say it would not stop."""
        model = self.board.config_for(slot.model).models[slot.model]
        timeout = model.health_check_timeout
        try:
            return await self.board.health.wait(slot.model, container, model.health, timeout)
        except BaseException:
            await self.stops.remove(slot.model, container, 0)
            raise

    async def _wake(
        self, slot: Slot, spec: ContainerSpec, asleep: Container, devices: tuple[int, ...] | None
    ) -> tuple[Container, float | None]:
        """Wake the model's sleeping container: it, with the seconds the wake took. One that
        cannot wake, or runs an older spec, is removed and a new one started (seconds None),
        placed as the decision said where it did."""
        await self.board.set(slot, step=Step.WAKING)
        timeout = self.board.config_for(slot.model).models[slot.model].health_check_timeout
        began = self.board.clock()
        if outdated(asleep, spec):
            log.info(
                "%s: its sleeping container %s runs an older spec; starting a new one",
                slot.model,
                asleep.name,
            )
        else:
            log.info("waking %s (%s)", slot.model, asleep.name)
            try:
                await self.board.sleep_mode.wake(asleep, timeout)
                return asleep, self.board.clock() - began
            except NotDone as error:
                log.warning(
                    "%s: wake failed (%s); stopping its container and starting a new one", slot.model, error
                )
        await self.stops.remove(slot.model, asleep, self.board.grace(slot.model))
        return await self._start(slot, await self.placer.place(spec, devices)), None

    async def _awake(
        self, slot: Slot, container: Container, decided: Decided, took: float, woke: float
    ) -> None:
        """The woken model is ready: its wake measured (`woke` seconds), the swap recorded."""
        decision = decided.decision
        await self.ready(slot, container, started=False)
        self._record(slot, decision, took)
        self.board.metrics.wake_seconds.labels(slot.model).observe(woke)
        self.board.measures.record_wake(slot.model, container.spec_hash, woke)
        log.info(
            "wake: %s awake in %.2fs (set %s, evicted %s, cost %d, swap %.2fs)",
            slot.model,
            woke,
            decision.set or "-",
            ", ".join(decision.evict) or "nothing",
            decision.cost,
            took,
        )

    async def ready(self, slot: Slot, container: Container, started: bool = True) -> None:
        await self.board.set(slot, State.READY, container=container)
        if started:  # a container started, not a sleeping one woken
            self.board.metrics.starts.labels(slot.model, "ready").inc()
        assert slot.start is not None
        slot.start.set_result(None)
        self.measure(slot, container)

    def measure(self, slot: Slot, container: Container) -> None:
        """Measure what the ready model holds on the GPUs, in a task: nobody waits for it."""
        if self.board.gpu is not None:
            self.board.spawn(self._measured(slot, container, self.board.gpu))

    async def _measured(self, slot: Slot, container: Container, gpu: GpuMemory) -> None:
        found = await gpu.measure(container)
        async with self.board.changed:
            if found is not None and slot.container is not None and slot.container.id == container.id:
                gpu.footprints[slot.model] = found
                self.board.measures.record_footprint(slot.model, container.spec_hash, found.memory)
                self.board.changed.notify_all()
                self.board.activity.changed(slot.model)

    async def start_failed(self, slot: Slot, error: BaseException) -> None:
        failure = error if isinstance(error, SwapctlError) else StartError(slot.model, repr(error))
        if isinstance(error, asyncio.CancelledError) and slot.model in self.board.alarms:
            failure = self.board.alarms[slot.model][1]  # ended by the watchdog: say why
        elif isinstance(failure, BackendError) and failure.model is None:  # the engine's, named for the model
            failure = type(failure)(failure.message, slot.model)
        elif getattr(failure, "model", slot.model) != slot.model:  # another model's failure ended this start
            failure = StartError(slot.model, str(failure))
        if isinstance(error, StopFailed) and error.model == slot.model:
            await self.stops.stuck(slot)  # its own unhealthy container would not stop
        else:
            await self.board.set(slot, State.STOPPED)
        log.error("%s", failure)
        self.board.metrics.starts.labels(slot.model, "failed").inc()
        assert slot.start is not None
        if not slot.start.done():
            slot.start.set_exception(failure)
