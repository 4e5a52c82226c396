"""The swappers of every host, over the config they share: `local` (this machine's engine)
and each host some model runs on (`hosts:`), each with its own engine, matrix and GPUs.

Each host's swapper is a whole swapper (its rooms, its promises, its upkeep) given its
host's config (`Config.on`); nothing is shared between them but the config they come from.
Where a request for a model goes among its hosts and the peers is `remote.places`' choice.
A config whose models are all local has one swapper, given the config itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import fields

from swapctl.config import Config
from swapctl.config.hosts import LOCAL_NAME
from swapctl.errors import SwapctlError
from swapctl.lifecycle.changes import Changes
from swapctl.lifecycle.slot import State
from swapctl.lifecycle.swapper import Swapper

log = logging.getLogger("swapctl")
ENGINE_INTERVAL = 2.0  # seconds between two pings of another host's engine
ENGINE_TIMEOUT = 5.0  # seconds a ping may take before the engine counts as not answering


class Fleet:
    def __init__(self, config: Config, swappers: Mapping[str, Swapper]) -> None:
        """`swappers` by host name, `local` among them."""
        self._config, self.swappers = config, dict(swappers)
        self.down: dict[str, str] = {}  # host -> why: an engine that does not answer its ping

    @classmethod
    def alone(cls, swapper: Swapper) -> Fleet:
        """One box: the local swapper, given the whole config."""
        return cls(swapper.config, {LOCAL_NAME: swapper})

    @property
    def config(self) -> Config:
        """The whole config now (each swapper has its host's part): a reload replaces it."""
        return self._config if len(self.swappers) > 1 else self.local.config

    @property
    def local(self) -> Swapper:
        return self.swappers[LOCAL_NAME]

    def hosts_of(self, model: str) -> list[tuple[str, Swapper]]:
        """The hosts `model` may run on, in the order its config prefers, with their swappers."""
        found = self.config.models.get(model)
        hosts = found.hosts if found is not None else ()
        return [(host, self.swappers[host]) for host in hosts if host in self.swappers]

    def of(self, model: str) -> Swapper:
        """The swapper `model` is on now (starting, running, asleep), else the first host it
        may run on; this machine's for a model of none."""
        hosts = self.hosts_of(model)
        for _, swapper in hosts:
            slot = swapper.slots.get(model)
            if slot is not None and slot.state is not State.STOPPED:
                return swapper
        return hosts[0][1] if hosts else self.local

    async def unload(self, model: str | None = None, timeout: float | None = None) -> list[str]:
        """Unload `model` on every host it is on (every model on every host, without one);
        what stopped, a model of another host as `model@host`."""
        pairs = self.hosts_of(model) if model is not None else list(self.swappers.items())
        stopped = await asyncio.gather(*(swapper.unload(model, timeout) for _, swapper in pairs))
        return [
            name if host == LOCAL_NAME else f"{name}@{host}"
            for (host, _), names in zip(pairs, stopped, strict=True)
            for name in names
        ]

    async def watch_engines(self, interval: float = ENGINE_INTERVAL) -> None:
        """Ping each other host's engine every `interval` seconds, forever (a task of the
        app's lifespan): one that stops answering is noticed here, not only by the next
        request (a killed dockerd leaves its containers running, reachable, unmanaged)."""
        while True:
            await asyncio.gather(*(self._ping(host, swapper) for host, swapper in self.remote()))
            await asyncio.sleep(interval)

    async def _ping(self, host: str, swapper: Swapper) -> None:
        try:
            answered = await asyncio.wait_for(swapper.backend.ping(), ENGINE_TIMEOUT)
            why = "" if answered else "its Docker engine does not answer"
        except (TimeoutError, OSError, SwapctlError) as error:
            why = f"its Docker engine does not answer ({error or type(error).__name__})"
        if why and host not in self.down:
            log.warning("host '%s': %s: its models answer 503 until it does", host, why)
            self.down[host] = why
        elif not why and host in self.down:
            log.info("host '%s': its Docker engine answers again", host)
            del self.down[host]

    def remote(self) -> list[tuple[str, Swapper]]:
        """The hosts other than this machine's."""
        return [(host, swapper) for host, swapper in self.swappers.items() if host != LOCAL_NAME]

    async def reload(self, config: Config) -> Changes:
        """Each host's swapper takes its part of the new config; hosts added or removed, or
        a host's engine changed, wait for a restart."""
        if len(self.swappers) == 1 and not config.by_host:
            return await self.local.reload(config)
        self._config = config
        merged: dict[str, list[str]] = {f.name: [] for f in fields(Changes)}
        new_hosts = set(config.host_names)
        for host, swapper in self.swappers.items():
            if host not in new_hosts:
                merged["needs_restart"].append(f"hosts.{host}")
                continue
            changes = await swapper.reload(config.on(host))
            for key, names in changes.to_json().items():
                merged[key] += [name if host == LOCAL_NAME else f"{name}@{host}" for name in names]
        merged["needs_restart"] += [f"hosts.{host}" for host in new_hosts - self.swappers.keys()]
        return Changes(**{key: tuple(dict.fromkeys(names)) for key, names in merged.items()})
