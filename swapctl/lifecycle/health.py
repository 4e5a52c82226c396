"""Waiting for a started container to answer its health check, with time through one door.

`now` and `sleep` are injected, so tests pass a manual clock and a health timeout takes no
real time. Polling starts at once and backs off a little: a fast server is seen within
milliseconds, a slow one costs at most a few requests a second.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx

from swapctl.backend import Container
from swapctl.backend.aio import AsyncBackend
from swapctl.errors import StartError

log = logging.getLogger("swapctl")
INSPECT_EVERY = 0.1  # seconds between asking the engine whether the container still runs
NOTE_EVERY = 5.0  # seconds between "still loading" log lines


def backoff(first: float = 0.01, factor: float = 1.5, most: float = 0.2) -> Iterator[float]:
    """Intervals between polls: 10 ms, growing by half each time, up to 200 ms."""
    interval = first
    while True:
        yield interval
        interval = min(interval * factor, most)


@dataclass(frozen=True)
class Clock:
    now: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]


class HealthCheck:
    def __init__(self, backend: AsyncBackend, client: httpx.AsyncClient, clock: Clock) -> None:
        self.backend, self.client, self.clock = backend, client, clock

    async def answers(self, container: Container, path: str) -> bool:
        """One probe: HTTP 200 from `path` (or `none`: no check at all)."""
        if path == "none":
            return True
        try:
            response = await self.client.get(container.url + path, timeout=2.0)
        except httpx.TransportError:
            return False  # refused, reset, or the port proxy not yet forwarding
        return response.status_code == 200

    async def wait(self, model: str, container: Container, path: str, timeout: float) -> Container:
        """The container once healthy (its port may be published only after the start);
        StartError if it exits or stays silent past `timeout`, quoting its last log lines."""
        began = inspected = noted = self.clock.now()
        for interval in backoff():
            if container.host_port is not None and await self.answers(container, path):
                return container
            now = self.clock.now()
            if now - inspected >= INSPECT_EVERY or container.host_port is None:
                inspected = now
                container = await self._still_running(model, container)
            if now - began > timeout:
                raise StartError(model, f"no HTTP 200 from {path} within healthCheckTimeout ({timeout:g}s)")
            if now - noted >= NOTE_EVERY:
                noted = now
                log.info("still loading %s (%.0fs)", model, now - began)
            await self.clock.sleep(interval)
        raise AssertionError("backoff() never ends")

    async def _still_running(self, model: str, container: Container) -> Container:
        current = await self.backend.get(container.id)
        if current is not None and current.running:
            return current
        logs = await self.backend.logs(container.id, 20)
        state = current.state if current else "removed"
        # The container's words, quoted so that none can pass for a line of the proxy's log:
        # each under `  | `, escaped as repr() would (\r, \x1b, \u2028), each line cut at 300
        # characters and the last lines kept within 2000.
        quoted: list[str] = []
        room = 2000
        for line in reversed(logs.rstrip().split("\n") if logs.strip() else []):
            text = repr(line[:300])[1:-1]
            text = text[:300] + " [cut]" if len(line) > 300 or len(text) > 300 else text
            room -= len(text)
            if room < 0:
                break
            quoted.insert(0, f"\n  | {text}")
        tail = f"; last log lines:{''.join(quoted)}" if quoted else ""
        raise StartError(model, f"the container {state} while starting{tail}")
