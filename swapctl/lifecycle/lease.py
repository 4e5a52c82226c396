"""A request's hold on a ready model: counted in flight until released, exactly once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import TracebackType

from swapctl.backend import Container


class Lease:
    """Use it as `async with`: leaving the block releases it, unless the hold was handed over
    (to a streamed response, say), whose new holder then releases it."""

    def __init__(self, model: str, container: Container, release: Callable[[], Awaitable[None]]) -> None:
        self.model = model
        self.container = container
        self._release: Callable[[], Awaitable[None]] | None = release
        self._handed_over = False

    @property
    def url(self) -> str:
        return self.container.url

    async def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            await release()

    def hand_over(self) -> Lease:
        """A lease for a new holder; this one's `async with` no longer releases."""
        self._handed_over = True
        taken = Lease(self.model, self.container, self._release or _nothing)
        self._release = None
        return taken

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.release()


async def _nothing() -> None:
    return None
