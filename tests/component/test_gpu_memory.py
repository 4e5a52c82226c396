"""Measured footprints and verified eviction: the swapper over the fake engine and a fake GPU
whose processes are the engine's containers, a stopped one's memory released late."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx
import pytest
from support import OUTSIDE, ContainerGpus, HexIds, ModelProcess, Swappers, swappers_fixture

from swapctl.backend.fake import FakeBackend
from swapctl.config import Config, parse_config
from swapctl.gpus import Device, FakeInventory, GpuProcess, Snapshot
from swapctl.lifecycle import Swapper
from swapctl.metrics import Metrics
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream
from swapctl.server import attributed, sample_gpus, watch_gpus

GIB = 2**30
OTHERS = GIB  # held by a process outside any container
VRAM = {"chat": 6 * GIB, "code": 4 * GIB, "big": 18 * GIB}
MATRIX = {"vars": {"c": "chat", "k": "code", "B": "big"}, "sets": {"pair": "c & k", "alone": "B"}}

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_config() -> Config:
    models = {name: {"image": "img", "stop_grace_period": 0} for name in VRAM}
    return parse_config({"models": models, "matrix": MATRIX, "instance": "test"})


@dataclass
class Holder(ModelProcess):
    reads_left: int | None = None  # once stopped: reads its memory lingers for (None: until freed)
    stopped: bool = False


class OneGpu(ContainerGpus[Holder]):
    """One 24 GiB GPU. Each running container of the engine has a process holding its model's
    `vram`; a stopped one's memory lingers for `linger` reads after the stop is seen (None:
    until `free()`), its process still `listed` by the driver or not. Records each container
    that started while another's memory lingered."""

    def __init__(
        self, backend: FakeBackend, linger: int | None, listed: bool = True, vram: dict[str, int] = VRAM
    ) -> None:
        super().__init__(backend, vram)
        self.linger, self.listed = linger, listed
        self.beside: list[tuple[str, str]] = []  # (a model started, a model whose memory lingered)
        self.reads = 0
        self.freed = False

    def free(self) -> None:
        with self.lock:
            self.freed = True

    def read(self) -> Snapshot:
        with self.lock:
            self.reads += 1
            running = self.running()
            self._forget_freed(running)
            lingering = [h.model for cid, h in self.holders.items() if cid not in running]
            for cid, model in running.items():
                if cid not in self.holders:
                    self.beside += [(model, old) for old in lingering]
                    self.holders[cid] = Holder(model, next(self.pids))
            return Snapshot((self._device(running),))

    def _forget_freed(self, running: dict[str, str]) -> None:
        for cid, holder in list(self.holders.items()):
            if cid in running:
                continue
            if not holder.stopped:
                holder.stopped, holder.reads_left = True, self.linger
            if self.freed or holder.reads_left == 0:
                del self.holders[cid]
            elif holder.reads_left is not None:
                holder.reads_left -= 1

    def _device(self, running: dict[str, str]) -> Device:
        held = sum(self.vram[h.model] for h in self.holders.values())
        listed = [(cid, h) for cid, h in self.holders.items() if cid in running or self.listed]
        processes = (GpuProcess(OUTSIDE, OTHERS), *(GpuProcess(h.pid, self.vram[h.model]) for _, h in listed))
        return Device(0, "GPU-aaaa", "NVIDIA L4", 24 * GIB, OTHERS + held, processes)


swapper_for = swappers_fixture(clocked=True)  # each Swapper on its own manual Clock


async def use(swapper: Swapper, model: str) -> None:
    await (await swapper.acquire(model)).release()


async def settled(swapper: Swapper) -> None:
    """Until the swapper's tasks (a footprint's measure among them) are over."""
    while swapper.tasks:
        await asyncio.gather(*list(swapper.tasks))


def released(swapper: Swapper, model: str, sample: str = "count") -> float | None:
    labels = {"model": model}
    return swapper.metrics.registry.get_sample_value(f"swapctl_gpu_release_seconds_{sample}", labels)


async def test_the_footprint_measured_once_ready_shows_in_running(
    swapper_for: Swappers,
) -> None:
    backend = HexIds()
    swapper = swapper_for(make_config(), backend, inventory=OneGpu(backend, linger=0))
    await use(swapper, "chat")
    await settled(swapper)
    async with httpx.AsyncClient(transport=backend.transport) as upstream:
        app = build_app(swapper.config, swapper, HttpxUpstream(upstream), swapper.metrics)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as client:
            answer = (await client.get("/running")).json()
    by_model = {m["model"]: m for m in answer["models"]}
    assert by_model["chat"]["gpu_memory"] == {"0": 6 * GIB}  # its process only, not the others'
    assert by_model["code"]["gpu_memory"] is None  # never measured
    row = swapper.row("chat")
    assert row is not None and row["gpu_memory"] == {"0": 6 * GIB}


@pytest.mark.parametrize("listed", [True, False], ids=["process-listed", "memory-only"])
async def test_a_start_waits_until_evicted_memory_is_back(
    swapper_for: Swappers, caplog: pytest.LogCaptureFixture, listed: bool
) -> None:
    caplog.set_level(logging.INFO, logger="swapctl")
    backend = HexIds()
    gpu = OneGpu(backend, linger=3, listed=listed)
    swapper = swapper_for(make_config(), backend, inventory=gpu)
    await asyncio.gather(use(swapper, "chat"), use(swapper, "code"))
    await settled(swapper)
    await use(swapper, "big")  # evicts chat and code, whose memory comes back three reads late
    await settled(swapper)
    assert swapper.running() == ["big"]
    assert gpu.beside == []  # big never started beside their memory
    assert "waiting for GPU memory of chat, code to be freed" in caplog.messages
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert released(swapper, "chat") == released(swapper, "code") == 1
    row = swapper.row("big")
    assert row is not None and row["gpu_memory"] == {"0": 18 * GIB}


async def test_memory_never_freed_lets_the_start_go_on_after_the_bound(
    swapper_for: Swappers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swapctl")
    backend = HexIds()
    gpu = OneGpu(backend, linger=None)
    swapper = swapper_for(make_config(), backend, inventory=gpu, release_wait=30.0)
    await use(swapper, "chat")
    await settled(swapper)
    await use(swapper, "big")  # the manual clock moves only as the wait sleeps
    assert swapper.running() == ["big"]
    assert "GPU memory of chat on GPU 0 not freed after 30s; starting big anyway" in caplog.messages
    assert released(swapper, "chat") == 1
    waited = released(swapper, "chat", "sum")
    assert waited is not None and waited >= 30.0
    await settled(swapper)
    assert gpu.beside == [("big", "chat")]


async def test_a_start_that_waited_on_a_release_the_test_frees(
    swapper_for: Swappers,
) -> None:
    backend = HexIds()
    gpu = OneGpu(backend, linger=None)
    swapper = swapper_for(make_config(), backend, inventory=gpu, release_wait=float("inf"))
    await use(swapper, "chat")
    await settled(swapper)
    start = asyncio.create_task(use(swapper, "big"))
    async with swapper.changed:  # chat stopped: big now waits on its memory alone
        await swapper.changed.wait_for(lambda: swapper.slots["chat"].stops == 1)
    assert not start.done() and "big" not in backend.running_models()
    gpu.free()
    await start
    await settled(swapper)
    assert gpu.beside == [] and released(swapper, "chat") == 1


async def test_no_inventory_no_wait_and_nothing_measured(swapper_for: Swappers) -> None:
    backend = HexIds()
    gpu = OneGpu(backend, linger=None)  # would never free: only read through the swapper's inventory
    swapper = swapper_for(make_config(), backend)
    await use(swapper, "chat")
    await use(swapper, "big")
    assert swapper.running() == ["big"] and gpu.reads == 0
    assert all(row["gpu_memory"] is None for row in swapper.rows())
    assert "swapctl_gpu" not in swapper.metrics.render().decode()


async def test_a_model_with_no_gpu_process_is_not_waited_for(swapper_for: Swappers) -> None:
    backend = HexIds()
    gpu = OneGpu(backend, linger=None, vram={"big": 18 * GIB})  # chat runs on the CPU
    swapper = swapper_for(make_config(), backend, inventory=gpu)
    await use(swapper, "chat")
    await settled(swapper)
    await use(swapper, "big")
    assert swapper.running() == ["big"]
    row = swapper.row("chat")
    assert row is not None and row["gpu_memory"] is None
    assert released(swapper, "chat") is None


async def test_up_hands_the_swapper_an_inventory_only_where_it_finds_a_gpu() -> None:
    backend = HexIds()
    found = FakeInventory((Device(0, "GPU-aaaa", "NVIDIA L4", 24 * GIB, 0),))
    assert await watch_gpus(Metrics(), found, backend, "test") is found
    assert await watch_gpus(Metrics(), FakeInventory(reason="no driver"), backend, "test") is None


async def test_the_page_s_gpu_chart_gets_each_device_and_each_model_sampled(
    swapper_for: Swappers,
) -> None:
    backend = HexIds()
    gpu = OneGpu(backend, linger=0)
    swapper = swapper_for(make_config(), backend, inventory=gpu)
    history = swapper.activity.last_hour
    sampling = asyncio.create_task(sample_gpus(history, attributed(gpu, backend, "test"), every=0.01))
    try:
        while not history.samples:
            await asyncio.sleep(0.01)
        await use(swapper, "chat")
        await use(swapper, "code")
        taken = len(history.samples)
        while len(history.samples) < taken + 2:  # samples taken once both run
            await asyncio.sleep(0.01)
    finally:
        sampling.cancel()
    found = history.to_json()["gpu"]
    (device,) = found["devices"]
    assert (device["index"], device["name"], device["total"]) == (0, "NVIDIA L4", 24 * GIB)
    assert device["used"][0] == OTHERS and device["used"][-1] == OTHERS + 10 * GIB
    assert found["models"]["chat"][0] == 0 and found["models"]["chat"][-1] == 6 * GIB
    assert found["models"]["code"][-1] == 4 * GIB
    assert len(found["times"]) == len(device["used"]) == len(found["models"]["chat"])
