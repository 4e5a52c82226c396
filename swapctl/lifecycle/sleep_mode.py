"""vLLM's sleep mode, asked of a model's server: put it to sleep, wake it, ask whether it sleeps.

A model with `sleep: 1|2` is put to sleep when evicted (`POST /sleep?level=N`): its server
frees its GPU memory but its process, and so its container, stays. A request wakes it, and it
serves once `GET /is_sleeping` says false. Level 1 kept its weights in CPU memory: `POST
/wake_up` restores them. Level 2 discarded them: as vLLM's docs say, it wakes its weights'
memory (`?tags=weights`), reloads them (`POST /collective_rpc` `reload_weights`), then wakes
its KV cache (`?tags=kv_cache`). A container whose level is not known (found asleep at
start-up) is woken as from level 2, which is right for both. These routes exist only on a
vLLM started with `--enable-sleep-mode` and VLLM_SERVER_DEV_MODE=1.

Each call that fails raises `NotDone` with the cause, for the swapper's warning: it then falls
back to stopping the container (a failed sleep) or to a cold start (a failed wake).
"""

from __future__ import annotations

import httpx

from swapctl.backend import Container
from swapctl.lifecycle.health import Clock, backoff


class NotDone(Exception):
    """A sleep or a wake that did not happen; the message says why."""


class SleepMode:
    def __init__(self, client: httpx.AsyncClient, clock: Clock) -> None:
        self.client, self.clock = client, clock
        self.levels: dict[str, int] = {}  # container ID -> the level it was put to sleep at

    async def sleep(self, container: Container, level: int, timeout: float) -> None:
        """Put the server to sleep at `level`; NotDone unless it answers 200 and then says it sleeps."""
        await self._post(container, f"/sleep?level={level}", timeout)
        if await self.asleep(container) is not True:
            raise NotDone("it answered POST /sleep but GET /is_sleeping does not say true")
        self.levels[container.id] = level

    async def wake(self, container: Container, timeout: float) -> None:
        """Wake the server (as its level needs) and wait until GET /is_sleeping says false,
        `timeout` seconds at most."""
        began = self.clock.now()

        def left() -> float:  # each call bounded by the time left
            return max(1.0, timeout - (self.clock.now() - began))

        if self.levels.pop(container.id, 2) == 1:
            await self._post(container, "/wake_up", left())
        else:
            await self._post(container, "/wake_up?tags=weights", left())
            await self._post(container, "/collective_rpc", left(), {"method": "reload_weights"})
            await self._post(container, "/wake_up?tags=kv_cache", left())
        for interval in backoff():
            if await self.asleep(container) is False:
                return
            if self.clock.now() - began > timeout:
                raise NotDone(f"GET /is_sleeping still not false after {timeout:g}s")
            await self.clock.sleep(interval)

    async def asleep(self, container: Container) -> bool | None:
        """Whether the server sleeps, as GET /is_sleeping says; None when it does not say."""
        try:
            response = await self.client.get(container.url + "/is_sleeping", timeout=5.0)
            found = response.json().get("is_sleeping") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return found if isinstance(found, bool) else None

    async def _post(
        self, container: Container, path: str, timeout: float, body: dict[str, str] | None = None
    ) -> None:
        try:
            response = await self.client.post(container.url + path, json=body, timeout=timeout)
        except httpx.HTTPError as error:
            raise NotDone(f"POST {path}: {_cause(error)}") from None
        if response.status_code != 200:
            raise NotDone(f"POST {path} answered HTTP {response.status_code}")


def _cause(error: httpx.HTTPError) -> str:
    """An httpx error in words: some (timeouts) have no message of their own."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
