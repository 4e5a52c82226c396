"""The one seam to the container engine: a small protocol, and the container as a value."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from swapctl.spec import ContainerSpec


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    model: str
    state: str  # the engine's word: created, running, exited, restarting, paused, dead
    host_port: int | None
    spec_hash: str
    started_at: float | None = None  # epoch seconds
    image_id: str = ""  # the image it runs, as the engine identifies it

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.host_port}"


class Backend(Protocol):
    """Synchronous calls; the swapper runs them in threads."""

    def list(self, instance: str) -> list[Container]:
        """Every container of this instance, whatever its state."""
        ...

    def start(self, spec: ContainerSpec) -> Container:
        """Create and start the container, published on 127.0.0.1; leave nothing behind on failure."""
        ...

    def get(self, container_id: str) -> Container | None:
        """The container now, or None once it is gone."""
        ...

    def stop(self, container_id: str, grace: float) -> None:
        """Stop gracefully, kill after `grace` seconds, and remove. A missing container is fine."""
        ...

    def image_id(self, image: str) -> str | None:
        """The engine's ID of the image a name points at now; None when it has none."""
        ...

    def logs(self, container_id: str, tail: int = 50) -> str: ...

    def follow(self, container_id: str) -> Iterator[str]:
        """Log lines as they come, until the container stops."""
        ...
