"""A request's hold on a model: a ticket from its admission (counted in flight, the model
perhaps still starting), then a lease on the ready model; either releases exactly once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from swapctl.backend import Container

Release = Callable[[], Awaitable[None]]


class Lease:
    """A hold on a ready model. Use it as `async with`, or call `release` (once is enough)."""

    def __init__(self, model: str, container: Container, release: Release, owner: Any = None) -> None:
        self.model = model
        self.container = container
        self._release: Release | None = release
        self.owner = owner  # the swapper that holds the model (forwarding asks it about a crash)

    @property
    def url(self) -> str:
        return self.container.url

    async def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            await release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.release()


class Ticket:
    """A request admitted on a model: counted in flight from now on, so that it can be refused
    at once (busy) and its wait for a start can happen elsewhere (after a response's head).
    `lease` waits until the model is ready and hands the hold over to a Lease; `release`
    gives it up, and does nothing once the hold is handed over."""

    def __init__(
        self,
        model: str,
        ready: Container | None,
        join: Callable[[], Awaitable[Container]],
        release: Release,
        owner: Any = None,
    ) -> None:
        self.model = model
        self.owner = owner  # the swapper that admitted it
        self._ready = ready  # its container, if the model was ready at admission
        self._join = join
        self._release: Release | None = release

    @property
    def ready(self) -> bool:
        """The model was ready at admission: `lease` does not wait."""
        return self._ready is not None

    async def lease(self) -> Lease:
        """The lease, once the model is ready; if its start fails (or the wait is cancelled),
        the hold is released and the error raised."""
        container = self._ready
        if container is None:
            try:
                container = await self._join()
            except BaseException:
                await self.release()
                raise
        release, self._release = self._release, None
        assert release is not None, "a ticket is turned into one lease"
        return Lease(self.model, container, release, self.owner)

    async def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            await release()
