"""The fake engine with every slow step of a model's life held at a gate the test opens.

`GatedBackend` is the async face the swapper uses (an `AsyncBackend`) over a `FakeBackend`,
with no threads: each image check, pull, container start and stop waits at `Gates` until
the test lets it go on or fail; a model's health check does the same through
`gated_health`. What passes no gate (list, get, logs) answers at once. The lifecycle's tests
and its stateful test drive every await of a swap through here, one step at a time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import httpx

from swapctl.backend import Container
from swapctl.backend.aio import AsyncBackend
from swapctl.backend.fake import FakeBackend, FakeContainer, FakeModel, echo
from swapctl.backend.progress import PullListener
from swapctl.config import Config
from swapctl.errors import BackendError, PullFailed
from swapctl.lifecycle import Swapper
from swapctl.spec import ContainerSpec

KINDS = ("image", "pull", "start", "stop", "health", "sleep", "wake")


@dataclass
class Op:
    """One step waiting at its gate: its kind, whose it is (a model, or an image for
    `image` and `pull`), and the answer the test gives (True: it goes on; False: it fails)."""

    kind: str
    owner: str
    answer: asyncio.Future[bool] = field(repr=False)


class Gates:
    """Where held steps wait. `held` kinds wait for `open`/`fail`; the others go on at once."""

    def __init__(self, held: tuple[str, ...] = ()) -> None:
        self.held = set(held)
        self.pending: list[Op] = []
        self.failed: list[tuple[str, str]] = []  # (kind, owner) of each step made to fail

    async def passes(self, kind: str, owner: str) -> bool:
        if kind not in self.held:
            return True
        op = Op(kind, owner, asyncio.get_running_loop().create_future())
        self.pending.append(op)
        try:
            return await op.answer
        finally:
            if op in self.pending:
                self.pending.remove(op)

    def find(self, kind: str, owner: str) -> Op | None:
        return next((op for op in self.pending if op.kind == kind and op.owner == owner), None)

    def answer(self, op: Op, ok: bool = True) -> None:
        if op in self.pending:
            self.pending.remove(op)
        if not op.answer.done():
            op.answer.set_result(ok)
            if not ok:
                self.failed.append((op.kind, op.owner))

    def open(self, kind: str, owner: str, ok: bool = True) -> None:
        """Answer the waiting step of that kind and owner (it must be waiting)."""
        op = self.find(kind, owner)
        assert op is not None, f"no {kind} of {owner} waits; waiting: {self.pending}"
        self.answer(op, ok)

    def free(self) -> None:
        """Hold nothing from now on; every waiting step goes on."""
        self.held.clear()
        for op in list(self.pending):
            self.answer(op)


class GatedBackend(AsyncBackend):
    """The swapper's async backend over `fake`, each slow call waiting at `gates`."""

    def __init__(self, fake: FakeBackend, gates: Gates) -> None:
        super().__init__(fake)
        self.fake, self.gates = fake, gates
        self._gate = gates.passes

    async def list(self, instance: str) -> list[Container]:
        return self.fake.list(instance)

    async def get(self, container_id: str) -> Container | None:
        return self.fake.get(container_id)

    async def logs(self, container_id: str, tail: int = 50) -> str:
        return self.fake.logs(container_id, tail)

    async def image_id(self, image: str) -> str | None:
        if not await self._gate("image", image):
            raise BackendError(f"the engine did not answer for image '{image}'")
        return self.fake.image_id(image)

    async def pull(self, image: str, on_progress: PullListener) -> None:
        if not await self._gate("pull", image):
            raise PullFailed(f"cannot pull image '{image}': the registry refused")
        self.fake.pull(image, on_progress)

    async def start(self, spec: ContainerSpec) -> Container:
        if not await self._gate("start", spec.model):
            raise BackendError(f"the engine refused to start {spec.name}", spec.model)
        return self.fake.start(spec)

    async def stop(self, container_id: str, grace: float) -> None:
        found = self.fake.get(container_id)
        if found is not None and not await self._gate("stop", found.model):
            raise BackendError(f"the engine refused to stop {found.name}", found.model)
        self.fake.stop(container_id, grace)


class GatedServer:
    """A fake model server whose health check (and vLLM's sleep routes) answer at the gates:
    200 or 503 for health; a sleep or wake that fails answers 500. `sleeping`: the IDs of
    the containers asleep."""

    def __init__(self, gates: Gates) -> None:
        self.gates = gates
        self.sleeping: set[str] = set()

    async def __call__(self, request: httpx.Request, box: FakeContainer) -> httpx.Response:
        gates, sleeping = self.gates, self.sleeping
        model, cid, path = box.spec.model, box.container.id, request.url.path
        if path == "/health":
            ok = await gates.passes("health", model) and cid not in sleeping
            return httpx.Response(200 if ok else 503, json={"status": "ok" if ok else "loading"})
        if path == "/is_sleeping":
            return httpx.Response(200, json={"is_sleeping": cid in sleeping})
        if path == "/sleep":
            if not await gates.passes("sleep", model):
                return httpx.Response(500)
            sleeping.add(cid)
            return httpx.Response(200)
        query = request.url.query.decode()
        first, last = path == "/wake_up" and query in ("", "tags=weights"), query in ("", "tags=kv_cache")
        if first and not await gates.passes("wake", model):  # a wake is held at its first call
            return httpx.Response(500)
        if path == "/wake_up" and last:
            sleeping.discard(cid)
        if path in ("/wake_up", "/collective_rpc"):
            return httpx.Response(200)
        return await echo(request, box)


class GatedWorld:
    """A swapper over the gated fake engine (on `clock`, if given); `held` kinds of steps wait
    for the test."""

    def __init__(self, config: Config, held: tuple[str, ...], clock: Any = None) -> None:
        self.fake = FakeBackend()
        self.gates = Gates(held)
        handler = self.server = GatedServer(self.gates)
        for model in config.models:
            self.fake.behaviour[model] = FakeModel(handler=handler)
        self.client = httpx.AsyncClient(transport=self.fake.transport)
        timing = {"clock": clock, "sleep": clock.sleep} if clock is not None else {}
        self.swapper = Swapper(config, GatedBackend(self.fake, self.gates), self.client, **timing)

    async def settle(self) -> None:
        for _ in range(50):
            await asyncio.sleep(0)

    async def waiting(self, kind: str, owner: str) -> None:
        for _ in range(500):
            if self.gates.find(kind, owner):
                return
            await asyncio.sleep(0)
        raise AssertionError(f"no {kind} of {owner} came to wait; waiting: {self.gates.pending}")

    async def close(self) -> None:
        self.gates.free()
        await self.client.aclose()
