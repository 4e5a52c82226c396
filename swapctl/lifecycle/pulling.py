"""A start's image: looked for, and pulled when its pull_policy says so, with the pull's
progress on the slot for those who wait."""

from __future__ import annotations

import logging

from swapctl.backend import PullTally
from swapctl.backend.progress import sizes
from swapctl.errors import ImageMissing, PullFailed
from swapctl.lifecycle.board import Board
from swapctl.lifecycle.slot import Slot, Step
from swapctl.spec import ContainerSpec

log = logging.getLogger("swapctl")


class Pulls:
    def __init__(self, board: Board) -> None:
        self.board = board

    async def ensure(self, slot: Slot, spec: ContainerSpec) -> None:
        """Pull the image as its pull_policy says: when absent (missing), before every start
        (always); absent with never fails the start. The pull is a step of its own, before the
        decision and before the health check's timeout begins."""
        if spec.pull_policy != "always" and await self.board.backend.image_id(spec.image) is not None:
            self.board.images.add(spec.image)
            return
        if spec.pull_policy == "never":
            raise ImageMissing(
                f"image '{spec.image}' is not on this machine and its pull_policy is never: "
                f"pull it (swapctl pull {slot.model}) or build it",
                slot.model,
            )
        tally = PullTally(spec.image)
        await self.board.set(slot, step=Step.PULLING, pulled=tally.pulled)
        log.info("pulling image %s for %s", spec.image, slot.model)
        began = self.board.clock()
        try:  # each report on the event loop: the bytes so far, for those who wait
            await self.board.backend.pull(spec.image, lambda report: slot.move(pulled=tally.add(report)))
        except PullFailed as error:
            raise PullFailed(error.message, slot.model) from None
        self.board.images.add(spec.image)
        took, pulled = self.board.clock() - began, tally.pulled
        log.info("pulled image %s in %.1fs (%s downloaded)", spec.image, took, sizes(pulled.done))
