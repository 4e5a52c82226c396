"""Placement of count-GPU models, the declared GPUs checked against the real ones, and a
verified eviction that a model starting beside it does not fool: the swapper and the CLI over
the fake engine and a fake GPU whose processes are the engine's containers."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import OUTSIDE, Clock, ContainerGpus, HexIds, ModelProcess, Swappers, swappers_fixture

from swapctl.backend.fake import FakeModel
from swapctl.cli import main
from swapctl.config import Config, parse_config
from swapctl.gpus import Device, GpuProcess, Snapshot
from swapctl.lifecycle import Swapper
from swapctl.metrics import Metrics
from swapctl.server import watch_gpus
from swapctl.spec import PLACED, ContainerSpec, build_spec

GIB = 2**30

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_config(
    models: Mapping[str, Mapping[str, Any]],
    sets: Mapping[str, str],
    gpus: int | None = 2,
    matrix: Mapping[str, Any] | None = None,
) -> Config:
    """`models` under a matrix of `sets` (or the `matrix` given, such as fit mode), on `gpus`
    declared GPUs of 24 GiB."""
    raw: dict[str, Any] = {
        "instance": "test",
        "models": {name: {"image": "img", "stop_grace_period": 0, **keys} for name, keys in models.items()},
    }
    if sets or matrix:
        raw["matrix"] = dict(matrix) if matrix else {"sets": dict(sets)}
    if gpus is not None:
        raw["hardware"] = {"gpus": [{"memory": "24GiB"}] * gpus}
    return parse_config(raw)


class GpuHexIds(HexIds):
    """HexIds with GPUs."""

    def __init__(self) -> None:
        super().__init__(gpus=True)

    def spec(self, model: str) -> ContainerSpec:
        """The spec the model's running container was created with."""
        [found] = [b.spec for b in self.boxes.values() if b.container.model == model and b.container.running]
        return found


@dataclass
class Holder(ModelProcess):
    devices: tuple[int, ...]


class Gpus(ContainerGpus[Holder]):
    """24 GiB GPUs. `outside` bytes are held on a device by a process in no container; each
    running container holds its model's `vram` on each GPU its request names (a count Docker
    places lands on the first). With `linger`, a stopped container's process stays listed,
    its memory held, until `free()`."""

    def __init__(
        self, backend: GpuHexIds, vram: Mapping[str, int], count: int = 2, outside: Mapping[int, int] = {}
    ) -> None:
        super().__init__(backend, vram)
        self.count, self.outside = count, outside
        self.linger = False

    def free(self) -> None:
        with self.lock:
            self.linger = False

    def read(self) -> Snapshot:
        with self.lock:
            running = self.running()
            for cid in [cid for cid in self.holders if cid not in running and not self.linger]:
                del self.holders[cid]
            for cid, model in running.items():
                if cid not in self.holders:
                    self.holders[cid] = Holder(model, next(self.pids), self._devices(cid))
            return Snapshot(tuple(self._device(index) for index in range(self.count)))

    def _devices(self, cid: str) -> tuple[int, ...]:
        spec = self.backend.boxes[cid].spec
        return tuple(int(i) for i in spec.gpus) if isinstance(spec.gpus, tuple) else (0,)

    def _device(self, index: int) -> Device:
        processes = [GpuProcess(OUTSIDE, self.outside[index])] if self.outside.get(index) else []
        processes += [
            GpuProcess(h.pid, self.vram[h.model]) for h in self.holders.values() if index in h.devices
        ]
        used = sum(p.memory_used or 0 for p in processes)
        return Device(index, f"GPU-{index}", "NVIDIA L4", 24 * GIB, used, tuple(processes))


swapper_for = swappers_fixture(clocked=True)  # a Swapper given no clock gets its own manual Clock


async def use(swapper: Swapper, model: str) -> None:
    await (await swapper.acquire(model)).release()


async def settled(swapper: Swapper) -> None:
    while swapper.tasks:
        await asyncio.gather(*list(swapper.tasks))


async def test_a_count_model_goes_to_the_gpu_with_the_most_free_memory(
    swapper_for: Swappers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swapctl")
    config = make_config({"chat": {"gpus": 1}}, {}, gpus=None)  # no declarations: the driver says
    backend = GpuHexIds()
    gpus = Gpus(backend, {"chat": 6 * GIB}, outside={0: 20 * GIB})  # GPU 0 busy
    swapper = swapper_for(config, backend, inventory=gpus)
    await use(swapper, "chat")
    assert backend.spec("chat").gpus == ("1",)
    assert "placing chat on GPU 1 (24 GiB free)" in caplog.messages
    [container] = backend.list("test")
    assert container.spec_hash == build_spec(config, "chat").spec_hash  # placement is not a change
    assert container.placed == ("1",)


async def test_declared_gpus_alone_place_by_the_running_footprints(
    swapper_for: Swappers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swapctl")
    models: dict[str, dict[str, Any]] = {
        "big": {"gpus": ["0"], "vram": "18GiB"},
        "chat": {"gpus": 1, "vram": "6GiB"},
    }
    backend = GpuHexIds()
    swapper = swapper_for(make_config(models, {"all": "big & chat"}), backend)  # no inventory
    await use(swapper, "big")
    await use(swapper, "chat")
    assert backend.spec("big").gpus == ("0",)  # pinned: as written
    assert PLACED not in backend.spec("big").labels
    assert backend.spec("chat").gpus == ("1",)
    assert "placing chat on GPU 1 (24 GiB free)" in caplog.messages


async def test_two_count_models_are_spread_over_the_gpus(swapper_for: Swappers) -> None:
    models = {"chat": {"gpus": 1, "vram": "6GiB"}, "code": {"gpus": 1, "vram": "4GiB"}}
    backend = GpuHexIds()
    swapper = swapper_for(make_config(models, {"pair": "chat & code"}), backend)
    await use(swapper, "chat")
    await use(swapper, "code")
    assert (backend.spec("chat").gpus, backend.spec("code").gpus) == (("0",), ("1",))  # a tie, then the freer


@pytest.mark.parametrize("gpus", ["all", ["0"]])
async def test_all_and_pinned_ids_are_left_as_written(swapper_for: Swappers, gpus: Any) -> None:
    config = make_config({"chat": {"gpus": gpus}}, {}, gpus=None)
    backend = GpuHexIds()
    swapper = swapper_for(config, backend, inventory=Gpus(backend, {"chat": GIB}, outside={0: 20 * GIB}))
    await use(swapper, "chat")
    assert backend.spec("chat") == build_spec(config, "chat")


async def test_nothing_known_leaves_the_count_to_docker(swapper_for: Swappers) -> None:
    config = make_config({"chat": {"gpus": 1}}, {}, gpus=None)  # no inventory, no declarations
    backend = GpuHexIds()
    await use(swapper_for(config, backend), "chat")
    assert backend.spec("chat") == build_spec(config, "chat")


async def test_a_restart_adopts_placed_containers_and_remembers_where_they_run(
    swapper_for: Swappers,
) -> None:
    models = {"chat": {"gpus": 1, "vram": "6GiB"}, "code": {"gpus": 1, "vram": "4GiB"}}
    config = make_config(models, {"pair": "chat & code"})
    backend = GpuHexIds()
    await use(swapper_for(config, backend), "chat")  # a tie: GPU 0
    [before] = backend.list("test")
    again = swapper_for(config, backend)
    assert await again.adopt() == ["chat"]
    [after] = backend.list("test")
    assert after.id == before.id  # adopted, not replaced
    await use(again, "code")  # chat counts on GPU 0 still
    assert backend.spec("code").gpus == ("1",)


async def test_a_model_starting_beside_an_eviction_does_not_make_it_wait(
    swapper_for: Swappers, caplog: pytest.LogCaptureFixture
) -> None:
    """big evicts chat, and waits for its memory; code, allowed beside big, starts on the same
    GPU meanwhile. Its new process must not count as chat's memory not back."""
    caplog.set_level(logging.INFO, logger="swapctl")
    models = {name: {"gpus": 1} for name in ("chat", "code", "big")}
    config = make_config(models, {"pair": "chat & code", "mix": "code & big"}, gpus=None)
    backend = GpuHexIds()
    gpus = Gpus(backend, {"chat": 6 * GIB, "code": 4 * GIB, "big": 12 * GIB}, count=1)
    clock = Clock()
    swapper = swapper_for(config, backend, clock, inventory=gpus, release_wait=30.0)
    await use(swapper, "chat")
    await settled(swapper)  # its footprint measured
    gpus.linger, clock.frozen = True, True  # chat's memory stays until freed; no bound passes meanwhile
    start = asyncio.create_task(use(swapper, "big"))
    async with swapper.changed:
        await swapper.changed.wait_for(lambda: swapper.slots["chat"].stops == 1)
    await use(swapper, "code")  # started at once, beside big's wait
    gpus.read()  # its process is listed now
    assert not start.done() and "big" not in backend.running_models()
    gpus.free()
    clock.frozen = False
    await start
    assert backend.started == ["chat", "code", "big"]
    assert "waiting for GPU memory of chat to be freed" in caplog.messages
    assert not [r.message for r in caplog.records if r.levelno >= logging.WARNING]


MISMATCHED = """
instance: test
models: {chat: {image: x}}
hardware:
  gpus: [{memory: 48GiB}, {memory: 12GiB}]
"""


def test_gpus_command_names_each_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "swapctl.yaml"
    path.write_text(MISMATCHED)
    backend = GpuHexIds()
    gpus = Gpus(backend, {})
    lines = [
        "warning: hardware.gpus.0.memory: declared 48 GiB, GPU 0 (NVIDIA L4, GPU-0) has 24 GiB",
        "note: hardware.gpus.1.memory: declared 12 GiB, GPU 1 (NVIDIA L4, GPU-1) has 24 GiB: planning for less",
    ]
    for argv in (["gpus"], ["gpus", "--json"]):
        code = 0
        try:
            main([*argv, "-c", str(path)], backend_factory=lambda: backend, inventory_factory=lambda: gpus)
        except SystemExit as done:
            code = int(done.code or 0)
        out = capsys.readouterr().out
        assert code == 0  # a mismatch is reported, not an error
        if "--json" in argv:
            found = json.loads(out)["mismatch"]
            assert [
                f"{'note' if m['note'] else 'warning'}: {m['key']}: {m['message']}" for m in found
            ] == lines
        else:
            assert out.splitlines()[-2:] == lines


async def test_up_warns_of_each_mismatch_at_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="swapctl")
    backend = GpuHexIds()
    gpus = Gpus(backend, {}, count=1)
    assert await watch_gpus(Metrics(), gpus, backend, "test", (24 * GIB, 24 * GIB)) is gpus
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["hardware.gpus: declared 2 GPUs, the driver reports 1 (GPU 0: NVIDIA L4)"]


async def test_a_model_placed_but_not_measured_yet_counts_by_its_vram_under_the_driver(
    swapper_for: Swappers,
) -> None:
    """The driver shows nothing yet of a model that has not allocated (it is starting, or
    never measured): its declared vram is counted, or two starts would share one GPU."""
    models = {"chat": {"gpus": 1, "vram": "20GiB"}, "code": {"gpus": 1, "vram": "20GiB"}}
    backend = GpuHexIds()
    gpus = Gpus(backend, {})  # no model's memory shows on the driver
    swapper = swapper_for(make_config(models, {"pair": "chat & code"}), backend, inventory=gpus)
    await use(swapper, "chat")
    await use(swapper, "code")
    assert backend.spec("chat").gpus == ("0",)
    assert backend.spec("code").gpus == ("1",)


async def test_fit_mode_decides_with_running_models_on_the_gpus_they_were_given(
    swapper_for: Swappers,
) -> None:
    """x and y would share one GPU, but their containers were placed on two; z needs a
    whole GPU: one of them must stop (x: the first name), and z goes where it left."""
    models = {m: {"gpus": 1, "vram": "12GiB"} for m in ("x", "y")} | {"z": {"gpus": 1, "vram": "24GiB"}}
    backend = GpuHexIds()
    swapper = swapper_for(make_config(models, {}, matrix={"fit": "gpu"}), backend)
    await use(swapper, "x")
    await use(swapper, "y")
    assert (backend.spec("x").gpus, backend.spec("y").gpus) == (("0",), ("1",))
    assert swapper.plan("z").evict == ("x",)
    await use(swapper, "z")
    assert backend.running_models() == {"y", "z"}
    assert backend.spec("z").gpus == ("0",)


async def test_a_stopped_model_is_placed_afresh_not_where_it_last_ran(swapper_for: Swappers) -> None:
    models = {
        "a": {"gpus": 1, "vram": "20GiB"},
        "x": {"gpus": 1, "vram": "12GiB"},
        "z": {"gpus": 1, "vram": "20GiB"},
    }
    backend = GpuHexIds()
    swapper = swapper_for(make_config(models, {}, matrix={"fit": "gpu"}), backend)
    await use(swapper, "a")
    await use(swapper, "x")
    assert backend.spec("x").gpus == ("1",)
    await swapper.unload("x")
    await use(swapper, "z")
    assert backend.spec("z").gpus == ("1",)
    await swapper.unload("a")
    assert swapper.plan("x").evict == ()  # GPU 0 is free: x need not go back to GPU 1
    await use(swapper, "x")
    assert backend.running_models() == {"x", "z"}
    assert backend.spec("x").gpus == ("0",)


async def test_fit_mode_starts_decided_together_are_placed_as_decided(swapper_for: Swappers) -> None:
    """GPU 0 has 20 GiB free, GPU 1 10 GiB. a (10 GiB) and b (20 GiB) are asked for at once:
    a's decision places it, so b's decision sees it there and makes room; placing a on the
    freest GPU once its start comes would leave b on a GPU without room for it."""
    vram = {"p": 4, "q": 14, "a": 10, "b": 20}
    gpus: dict[str, Any] = {"p": ["0"], "q": ["1"], "a": 1, "b": 1}
    models = {m: {"gpus": gpus[m], "vram": f"{vram[m]}GiB"} for m in vram}
    config = make_config(models, {}, matrix={"fit": "gpu", "evict_costs": {"p": 5, "q": 5}})
    backend = GpuHexIds()
    for model in ("a", "b"):
        backend.behaviour[model] = FakeModel(ready_after=0.05)
    swapper = swapper_for(config, backend)
    await use(swapper, "p")
    await use(swapper, "q")
    await asyncio.gather(use(swapper, "a"), use(swapper, "b"))
    used = [0, 0]
    for model in backend.running_models():
        devices = backend.spec(model).gpus
        assert isinstance(devices, tuple), f"{model} was not placed: {devices}"
        for device in devices:
            used[int(device)] += vram[model]
    assert max(used) <= 24, f"GPU memory in use: {used} GiB, running {sorted(backend.running_models())}"
