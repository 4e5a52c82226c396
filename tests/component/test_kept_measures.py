"""Kept measurements in use: the swapper records starts and footprints, decides with
`evict_costs: auto`, keeps them across a restart; `plan` and `validate` read them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from support import Clock, FakeStack, HexIds, Swappers, config_file, run_cli, swappers_fixture

from swapctl.backend.fake import FakeBackend, FakeModel
from swapctl.config import Config, load_config, parse_config
from swapctl.gpus import Device, GpuProcess, Snapshot
from swapctl.lifecycle import Swapper
from swapctl.measures import MeasureStore, measures_path
from swapctl.spec import build_spec

GIB = 2**30
DOCUMENT: dict[str, Any] = {
    "instance": "test",
    "models": {name: {"image": "img", "stop_grace_period": 0} for name in ("slow", "quick", "new")},
    "matrix": {
        "sets": {"old": "slow & quick", "with_slow": "new & slow", "with_quick": "new & quick"},
        "evict_costs": "auto",
    },
}

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


swapper_for = swappers_fixture()


async def use(swapper: Swapper, model: str) -> None:
    await (await swapper.acquire(model)).release()


def slow_and_quick(clock: Clock, slow: float, quick: float) -> FakeBackend:
    """A fake engine whose `slow` and `quick` containers answer their health check after
    `slow` and `quick` seconds of the test's clock."""
    backend = FakeBackend(clock=clock)
    backend.behaviour["slow"] = FakeModel(ready_after=slow)
    backend.behaviour["quick"] = FakeModel(ready_after=quick)
    return backend


@pytest.mark.parametrize(("slow", "quick", "evicted"), [(30.0, 2.0, "quick"), (2.0, 30.0, "slow")])
async def test_the_quicker_to_restart_is_evicted(
    swapper_for: Swappers, tmp_path: Path, slow: float, quick: float, evicted: str
) -> None:
    clock = Clock()
    config = parse_config(DOCUMENT)
    swapper = swapper_for(config, slow_and_quick(clock, slow, quick), clock)
    await use(swapper, "slow")
    await use(swapper, "quick")
    starts = {m: swapper.measures.get(m, build_spec(config, m).spec_hash) for m in ("slow", "quick")}
    assert all(kept is not None and len(kept.starts) == 1 for kept in starts.values())
    assert swapper.plan("new").evict == (evicted,)
    await use(swapper, "new")
    assert swapper.running() == sorted({"slow", "quick", "new"} - {evicted})
    await swapper.unload()


async def test_a_restart_keeps_the_measurements(swapper_for: Swappers, tmp_path: Path) -> None:
    path = measures_path(tmp_path / "state", "test")
    config = parse_config(DOCUMENT)
    clock = Clock()
    first = swapper_for(config, slow_and_quick(clock, 2.0, 30.0), clock, measures=MeasureStore.load(path))
    await use(first, "slow")
    await use(first, "quick")
    await first.unload()
    await first.measures.flush()

    backend = FakeBackend(clock=clock)  # what the first left running: adopted, not started
    for model in ("slow", "quick"):
        backend.start(build_spec(config, model))
    second = swapper_for(config, backend, clock, measures=MeasureStore.load(path))
    assert await second.adopt() == ["quick", "slow"]
    assert second.plan("new").evict == ("slow",)  # quicker by what the first measured
    cold = swapper_for(config, backend, clock)  # the same, with nothing kept
    await cold.adopt()
    assert cold.plan("new").evict == ("quick",)
    await second.unload()


class OneGpu:
    """One GPU on which each running container of the engine has a process holding 6 GiB."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def _pids(self) -> dict[int, str]:
        running = [c.id for c in self.backend.list("test") if c.running]
        return {100 + i: cid for i, cid in enumerate(running)}

    def read(self) -> Snapshot:
        processes = tuple(GpuProcess(pid, 6 * GIB) for pid in self._pids())
        return Snapshot((Device(0, "GPU-a", "NVIDIA L4", 24 * GIB, 6 * GIB * len(processes), processes),))

    def cgroup(self, pid: int) -> str | None:
        cid = self._pids().get(pid)
        return f"0::/system.slice/docker-{cid}.scope\n" if cid else None


async def test_a_measured_footprint_is_kept(swapper_for: Swappers, tmp_path: Path) -> None:
    path = measures_path(tmp_path, "test")
    config = parse_config(DOCUMENT)
    backend = HexIds()
    swapper = swapper_for(config, backend, Clock(), inventory=OneGpu(backend), measures=MeasureStore(path))
    await use(swapper, "slow")
    while swapper.tasks:  # the footprint is measured in a task of its own
        await asyncio.gather(*list(swapper.tasks))
    await swapper.measures.flush()
    kept = MeasureStore.load(path).get("slow", build_spec(config, "slow").spec_hash)
    assert kept is not None and kept.footprint == ((0, 6 * GIB),)
    await swapper.unload()


async def test_the_plan_route_decides_with_the_kept_costs() -> None:
    stack = FakeStack(DOCUMENT)
    config = stack.swapper.config
    stack.swapper.board.measures = measures = MeasureStore()
    for _ in range(3):
        measures.record_start("slow", build_spec(config, "slow").spec_hash, 2.0)
        measures.record_start("quick", build_spec(config, "quick").spec_hash, 30.0)
    try:
        await stack.use("slow")
        await stack.use("quick")
        plan = (await stack.client.get("/plan/new")).json()
        assert (plan["evict"], plan["cost"]) == (["slow"], 2)
    finally:
        await stack.close()


# --- the commands ------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    return run_cli(capsys, FakeBackend, *argv)


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "state"
    monkeypatch.setenv("SWAPCTL_STATE_DIR", str(folder))
    return folder


def write_config(tmp_path: Path, document: dict[str, Any]) -> tuple[Path, Config]:
    path = config_file(tmp_path, document)
    return path, load_config(path)


def test_plan_shows_where_each_cost_comes_from(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path
) -> None:
    names = ("chat", "code", "fixed", "plain", "new")
    document = {
        "instance": "test",
        "models": {name: {"image": "img"} for name in names},
        "matrix": {
            "sets": {"old": "chat & code & fixed & plain", "with_chat": "new & chat"},
            "evict_costs": {"chat": "auto", "code": "auto", "fixed": 4},
        },
    }
    path, config = write_config(tmp_path, document)
    store = MeasureStore(measures_path(state, "test"))
    for seconds in (12.0, 12.4, 13.1, 11.9, 20.0):
        store.record_start("chat", build_spec(config, "chat").spec_hash, seconds)

    code, out, err = run(capsys, "plan", "new", "-c", str(path), "--running", "chat,code,fixed,plain")
    assert (code, err) == (0, "")
    assert "stop code, fixed, plain (cost 6)" in out
    assert out.splitlines()[-5:] == [
        "costs of the running models, and where each comes from:",
        "  chat     13  auto: median of 5 starts (12.4 s)",
        "  code      1  auto: not measured yet",
        "  fixed     4  evict_costs",
        "  plain     1  default",
    ]
    code, out, _ = run(capsys, "plan", "new", "-c", str(path), "--running", "chat,code,fixed,plain", "--json")
    assert json.loads(out)["costs"] == {
        "chat": {"cost": 13, "source": "auto: median of 5 starts (12.4 s)"},
        "code": {"cost": 1, "source": "auto: not measured yet"},
        "fixed": {"cost": 4, "source": "evict_costs"},
        "plain": {"cost": 1, "source": "default"},
    }
    code, out, _ = run(capsys, "plan", "chat", "-c", str(path), "--running", "chat", "--json")
    assert json.loads(out)["costs"] == {}  # it runs: nothing is stopped, no cost is shown


def test_plan_evicts_by_the_kept_costs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path
) -> None:
    path, config = write_config(tmp_path, DOCUMENT)
    argv = ("plan", "new", "-c", str(path), "--running", "slow,quick", "--json")
    assert json.loads(run(capsys, *argv)[1])["evict"] == ["quick"]  # a tie
    store = MeasureStore(measures_path(state, "test"))
    store.record_start("slow", build_spec(config, "slow").spec_hash, 3.0)
    store.record_start("quick", build_spec(config, "quick").spec_hash, 40.0)
    assert json.loads(run(capsys, *argv)[1])["evict"] == ["slow"]


def test_validate_notes_a_footprint_over_its_vram(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, state: Path
) -> None:
    document = {
        "instance": "test",
        "models": {
            "chat": {"image": "img", "gpus": 1, "vram": "18GiB"},
            "code": {"image": "img", "gpus": 1},
        },
    }
    path, config = write_config(tmp_path, document)
    code, _, err = run(capsys, "validate", "-c", str(path))
    assert (code, err) == (0, "")
    store = MeasureStore(measures_path(state, "test"))
    store.record_footprint("chat", build_spec(config, "chat").spec_hash, [(0, int(19.05 * GIB))])
    store.record_footprint("code", build_spec(config, "code").spec_hash, [(1, 5 * GIB)])
    code, out, err = run(capsys, "validate", "-c", str(path))
    assert code == 0 and out.startswith("ok:")
    assert err.splitlines() == [
        "note: models.chat.vram: chat held 19.1 GiB on GPU 0 when last measured, over its vram of 18 GiB",
        "note: models.code.vram: not set; code held 5 GiB on GPU 1 when last measured: vram: 5GiB would declare it",
    ]
