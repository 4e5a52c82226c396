"""The backend's blocking calls, each run in a worker thread, so callers simply await."""

from __future__ import annotations

import asyncio

from swapctl.backend.base import Backend, Container
from swapctl.spec import ContainerSpec


class AsyncBackend:
    def __init__(self, backend: Backend) -> None:
        self.sync = backend

    async def list(self, instance: str) -> list[Container]:
        return await asyncio.to_thread(self.sync.list, instance)

    async def start(self, spec: ContainerSpec) -> Container:
        return await asyncio.to_thread(self.sync.start, spec)

    async def get(self, container_id: str) -> Container | None:
        return await asyncio.to_thread(self.sync.get, container_id)

    async def stop(self, container_id: str, grace: float) -> None:
        await asyncio.to_thread(self.sync.stop, container_id, grace)

    async def image_id(self, image: str) -> str | None:
        return await asyncio.to_thread(self.sync.image_id, image)

    async def logs(self, container_id: str, tail: int = 50) -> str:
        return await asyncio.to_thread(self.sync.logs, container_id, tail)
