"""Placing a model on GPUs: a count of GPUs fixed on the devices its decision chose (fit
mode), else on those with the most free memory once its evictions are over (see `placement`,
the pure part); free as the driver reports it, else as declared less the running footprints."""

from __future__ import annotations

import logging

from swapctl.lifecycle import placement
from swapctl.lifecycle.board import Board
from swapctl.lifecycle.slot import Slot
from swapctl.spec import ContainerSpec

log = logging.getLogger("swapctl")


class Placer:
    def __init__(self, board: Board) -> None:
        self.board = board

    async def place(self, spec: ContainerSpec, decided: tuple[int, ...] | None = None) -> ContainerSpec:
        """A count of GPUs fixed on the devices the decision placed the model on (fit mode),
        else on those with the most free memory now, after the evictions (see `placement`);
        the spec as written where nothing says what is free."""
        self.board.placed.pop(spec.model, None)
        wanted = placement.ask(spec)
        chosen = tuple(d for d in decided or () if wanted is not None and d not in wanted.pinned)
        if wanted is not None and decided is not None and len(chosen) == wanted.count:
            self.board.placed[spec.model] = chosen
            log.info(
                "placing %s on GPU %s (the decision's placement)", spec.model, ", ".join(map(str, chosen))
            )
            return placement.place(spec, chosen)
        free = await self._free_memory(spec.model) if wanted is not None else None
        devices = placement.choose(free, wanted) if wanted is not None and free is not None else None
        if devices is None or free is None:
            return spec
        self.board.placed[spec.model] = devices
        log.info(placement.placing_line(spec.model, devices, free))
        return placement.place(spec, devices)

    async def _free_memory(self, model: str) -> dict[int, int] | None:
        """Each GPU's free bytes: as the driver reports them (less the `vram` of models placed
        but not measured yet: they may not have allocated), else as declared less the `vram`
        of the other models holding GPUs; None where neither is known."""
        snapshot = await self.board.gpu.snapshot() if self.board.gpu is not None else None
        config = self.board.config_for(model)
        if snapshot is not None:
            unmeasured = {
                m: placement.devices_of(config.footprints.get(m), self.board.placed.get(m))
                for m, s in self.board.slots.items()
                if m != model and s.running and not self._measured_now(m, s)
            }
            return placement.less_declared(placement.measured_free(snapshot), config.footprints, unmeasured)
        if config.gpu_memory is None:
            return None
        holding = [m for m, s in self.board.slots.items() if (s.running or s.leaving) and m != model]
        footprints = config.footprints
        running = {m: placement.devices_of(footprints.get(m), self.board.placed.get(m)) for m in holding}
        return placement.declared_free(config.gpu_memory, footprints, running)

    def _measured_now(self, model: str, slot: Slot) -> bool:
        """Whether the footprint of the model's current container has been measured."""
        measured = self.board.gpu.footprints.get(model) if self.board.gpu is not None else None
        return measured is not None and slot.container is not None and measured.container == slot.container.id
