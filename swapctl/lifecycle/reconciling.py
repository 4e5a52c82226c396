"""Reconciling what runs with what the config says: a reload (models added, removed,
replaced, or forbidden beside the rest by the new policy) and, at start-up, adopting the
containers found running.

Both evict the way a swap does: a model to replace or remove is leaving (its requests in
flight finish first), then stopped; a removed model's slot goes once it has stopped, and
until then it runs under `retiring`, the last config that named it. Whether a container is
out of date is one question (`board.outdated`): another spec hash, or an image rebuilt
under its name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from swapctl.backend import Container
from swapctl.config import Config
from swapctl.errors import BackendError, StopFailed, SwapctlError
from swapctl.lifecycle.board import Board, outdated
from swapctl.lifecycle.changes import Changes, keep_fixed
from swapctl.lifecycle.slot import Slot, State, Step
from swapctl.lifecycle.starting import Starts
from swapctl.lifecycle.stopping import Stops
from swapctl.matrix import Policy, allowed_part
from swapctl.spec import build_spec

log = logging.getLogger("swapctl")


class Reconciler:
    def __init__(self, board: Board, stops: Stops, starts: Starts) -> None:
        self.board, self.stops, self.starts = board, stops, starts

    async def reload(self, config: Config) -> Changes:
        """Take `config` from the next decision on. Models whose container spec and image are
        unchanged keep running untouched; changed and removed ones, and those the new policy
        forbids beside the rest (the cheapest to lose), are evicted as a swap evicts: their
        requests in flight finish first, and a changed model's next request starts its new
        spec. The keys a running proxy cannot change keep their old value (`needs_restart`)."""
        images = await self._image_ids(config)
        async with self.board.changed:  # no await from here on: every decision sees one config whole
            config, needs_restart = keep_fixed(self.board.config, config)
            old, self.board.config = self.board.config, config
            added = tuple(m for m in config.models if m not in old.models)
            removed = tuple(m for m in old.models if m not in config.models)
            kept = [m for m in config.models if m in old.models]
            replaced = tuple(m for m in kept if self._outdated(m, old, images))
            self._take(old, removed)
            for model in (*removed, *replaced):
                self._retire(self.board.slots[model])
            forbidden = self._enforce(self.board.policy())
        unchanged = tuple(m for m in kept if m not in replaced)
        changes = Changes(added, removed, replaced, unchanged, forbidden, needs_restart)
        self.board.activity.reloaded(changes.to_json())
        for model in added:
            self.board.activity.changed(model)
        return changes

    async def _image_ids(self, config: Config) -> dict[str, str | None]:
        """The ID each image of a model that has a container has now, so that an image rebuilt
        under its name counts as a change (as at adoption); None where the engine cannot say."""
        names = {
            config.models[m].image for m, s in self.board.slots.items() if s.container and m in config.models
        }
        ids: dict[str, str | None] = {}
        for name in sorted(names):
            try:
                ids[name] = await self.board.backend.image_id(name)
            except BackendError:
                ids[name] = None
        return ids

    def _outdated(self, model: str, old: Config, images: Mapping[str, str | None]) -> bool:
        """Whether what `model` runs (its container, else what `old` would start) differs from
        what the current config starts: another spec hash, or an image rebuilt under its name."""
        spec = build_spec(self.board.config, model)
        container = self.board.slots[model].container
        if container is None:
            return build_spec(old, model).spec_hash != spec.spec_hash
        return outdated(container, spec, images.get(spec.image))

    def _take(self, old: Config, removed: tuple[str, ...]) -> None:
        """Slots for the added models (one a reload removed and that still drains keeps its
        own); the removed ones run under `old` until they are gone."""
        for model in removed:
            self.board.retiring[model] = old
        for model in self.board.config.models:
            self.board.retiring.pop(model, None)
            if model not in self.board.slots:
                self.board.slots[model] = Slot(model)

    def _enforce(self, policy: Policy) -> tuple[str, ...]:
        """Evict what the policy does not allow together, keeping the costliest to lose (as
        adoption does); the models evicted."""
        running = [m for m, s in self.board.slots.items() if s.running and m in self.board.config.models]
        forbidden = tuple(sorted(set(running) - set(allowed_part(policy, running))))
        for model in forbidden:
            log.info("reload: stopping %s: the new policy does not allow it beside the rest", model)
            self._retire(self.board.slots[model])
        return forbidden

    def _retire(self, slot: Slot) -> None:
        """Evict `slot` in a task, as a swap does (its lock held): leaving from now on, it
        admits no new request and stops once those in flight finish."""
        if slot.phase is State.STOPPED:
            self.forget(slot)
            return
        self.board.move(slot, leaving=True)
        self.board.spawn(self._retired(slot, slot.stops))

    async def _retired(self, slot: Slot, stops: int) -> None:
        try:
            # else another eviction stopped it since, and it may be new; asleep, it still runs
            if slot.stops == stops or slot.phase is State.SLEEPING:
                await self.stops.evict(slot)
        except SwapctlError as error:  # a failed stop is logged and tried again by the upkeep
            log.warning("reload: stopping %s: %s", slot.model, error)
        async with self.board.changed:
            self.forget(slot)

    def forget(self, slot: Slot) -> None:
        """Drop the slot of a model no config names any more, once it is stopped and idle
        (its lock held): it leaves /running and the metrics' gauges."""
        model = slot.model
        idle = slot.phase is State.STOPPED and not slot.leaving and not slot.in_flight
        if idle and model not in self.board.config.models and self.board.slots.get(model) is slot:
            del self.board.slots[model]
            self.board.retiring.pop(model, None)
            self.board.changed.notify_all()  # requests waiting for it learn that it is gone
            self.board.activity.removed(model)

    async def adopt(self) -> list[str]:
        """Take over this instance's containers whose spec and image still match, as far as
        the policy allows them together; stop the rest."""
        matching: dict[str, Container] = {}
        for container in await self.board.backend.list(self.board.config.instance):
            why = await self._unadoptable(container, matching)
            if why is None:
                matching[container.model] = container
                self.board.images.add(self.board.config.models[container.model].image)
            else:
                log.info("removing %s: %s", container.name, why)
                await self._discard(container)
        for model, container in list(matching.items()):
            if self.board.config.models[model].sleep is not None and await self.board.sleep_mode.asleep(
                container
            ):
                del matching[model]  # counted as stopped, as when it fell asleep here
                await self.board.set(self.board.slots[model], State.SLEEPING, container=container)
                log.info("adopted %s (%s), asleep", model, container.name)
        allowed = allowed_part(self.board.policy(), matching)
        for model, container in matching.items():
            if model not in allowed:
                log.info("stopping %s: the policy does not allow it beside %s", model, ", ".join(allowed))
                await self._discard(container)
        for model in allowed:
            self.board.placed[model] = tuple(int(i) for i in matching[model].placed if i.isdigit())
            await self._take_over(self.board.slots[model], matching[model])
        return list(allowed)

    async def _unadoptable(self, container: Container, adopted: Mapping[str, Container]) -> str | None:
        """Why `container` cannot be adopted; None when it can."""
        if container.model not in self.board.slots or container.model in adopted:
            return "left over"
        if not container.running:
            return container.state
        if container.host_port is None:
            return "it publishes no port"
        spec = build_spec(self.board.config, container.model)
        try:
            image = await self.board.backend.image_id(spec.image)
        except BackendError:
            image = None  # the engine cannot say: judged by its spec alone, as a reload does
        if outdated(container, spec, image):
            return "its spec or image changed"  # an image may be rebuilt under its name
        return None

    async def _discard(self, container: Container) -> None:
        """Remove a container found at start-up; one that would not stop counts as running."""
        try:
            await self.stops.remove(container.model, container, self.board.grace(container.model))
        except StopFailed:
            slot = self.board.slots.get(container.model)
            if slot is None or slot.container is not None:
                raise  # nothing could keep counting it
            await self.board.set(slot, container=container)
            await self.stops.stuck(slot)

    async def _take_over(self, slot: Slot, container: Container) -> None:
        """Ready at once if its health check answers now; else starting, as after a start of
        its own (it may still be loading), with its healthCheckTimeout."""
        if await self.board.health.answers(container, self.board.config.models[slot.model].health):
            await self.board.set(slot, State.READY, container=container)
            log.info("adopted %s (%s)", slot.model, container.name)
            self.starts.measure(slot, container)
            return
        log.info("adopting %s (%s): waiting for its health check", slot.model, container.name)
        async with self.board.changed:
            self.starts.launch(slot, State.STARTING, Step.LOADING)
            self.board.move(slot, container=container, owner=self.board.spawn(self._resume(slot, container)))

    async def _resume(self, slot: Slot, container: Container) -> None:
        began = self.board.clock()
        try:
            healthy = await self.starts.until_healthy(slot, container)
        except BaseException as error:
            await self.starts.start_failed(slot, error)
            if not isinstance(error, Exception):
                raise
            return
        await self.starts.ready(slot, healthy)
        log.info(
            "adopted %s (%s), healthy after %.3fs", slot.model, container.name, self.board.clock() - began
        )
