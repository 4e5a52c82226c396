"""The one seam to the container engine: a small protocol, and the container as a value."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from swapctl.backend.progress import PullListener
from swapctl.spec import ContainerSpec


@dataclass(frozen=True)
class Container:
    id: str
    name: str
    model: str
    state: str  # the engine's word: created, running, exited, restarting, paused, dead
    host_port: int | None  # where swapctl reaches it: the published port, or its own on swapctl's network
    spec_hash: str
    started_at: float | None = None  # epoch seconds
    image_id: str = ""  # the image it runs, as the engine identifies it
    placed: tuple[str, ...] = ()  # the GPU device IDs swapctl chose for it (label swapctl.gpus)
    # where its engine publishes its port (the engine's `address`), or its own on swapctl's network
    address: str = "127.0.0.1"

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.host_port}"


class LogFollow(Protocol):
    """A container's log, followed: its lines as they come, until the container stops or
    `close` is called, from any thread (a wait for the next line then ends)."""

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Synchronous calls; the swapper runs them in threads."""

    def list(self, instance: str) -> list[Container]:
        """Every container of this instance, whatever its state."""
        ...

    def start(self, spec: ContainerSpec) -> Container:
        """Create and start the container, published on the engine's address (127.0.0.1 for
        this machine's), or on swapctl's network (`spec.network`, created when missing) with
        no port published; leave nothing behind on failure."""
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

    def pull(self, image: str, on_progress: PullListener) -> None:
        """Pull `image` from its registry, with the credentials of the user's Docker config,
        calling `on_progress` (in the calling thread) for each report of the engine; a
        failure, before or during the stream, is PullFailed naming the image and the answer."""
        ...

    def logs(self, container_id: str, tail: int = 50) -> str: ...

    def ping(self) -> bool:
        """Whether the engine answers now: False once it stops answering (within its timeout)."""
        ...

    def follow(self, container_id: str) -> LogFollow:
        """Log lines as they come, until the container stops or the follow is closed."""
        ...
