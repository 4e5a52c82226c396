"""`swapctl gpus` and the GPU gauges of /metrics over the fake inventory: no GPU, no NVML."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from swapctl.backend import Backend, Container
from swapctl.backend.fake import FakeBackend
from swapctl.cli import main
from swapctl.config import load_config
from swapctl.gpus import Device, FakeInventory, GpuProcess, Inventory, NoGpu, Snapshot, read_attributed
from swapctl.lifecycle import Swapper
from swapctl.metrics import Metrics
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream
from swapctl.spec import build_spec

GIB = 2**30
CONFIG = """
instance: gpu-test
models:
  qwen: {image: x}
  whisper: {image: x}
"""


class DockerLikeBackend(FakeBackend):
    """The fake engine with 64-hex container IDs, as Docker writes them into cgroup paths."""

    def list(self, instance: str) -> list[Container]:
        return [replace(c, id=hex_id(c.id)) for c in super().list(instance)]


def hex_id(fake_id: str) -> str:
    return hashlib.sha256(fake_id.encode()).hexdigest()


def scope(container_id: str) -> str:
    return f"0::/system.slice/docker-{container_id}.scope\n"


def world(tmp_path: Path) -> tuple[Path, DockerLikeBackend, FakeInventory]:
    path = tmp_path / "swapctl.yaml"
    path.write_text(CONFIG)
    config = load_config(path)
    backend = DockerLikeBackend()
    qwen = backend.start(build_spec(config, "qwen"))
    whisper = backend.start(build_spec(config, "whisper"))
    devices = (
        Device(0, "GPU-aaaa", "NVIDIA RTX 4090", 24 * GIB, 20 * GIB, (GpuProcess(101, 18 * GIB),)),
        Device(
            1,
            "GPU-bbbb",
            "NVIDIA RTX 4090",
            24 * GIB,
            3 * GIB,
            (GpuProcess(102, 2 * GIB), GpuProcess(7, GIB)),
        ),
    )
    cgroups = {101: scope(hex_id(qwen.id)), 102: scope(hex_id(whisper.id)), 7: "0::/user.slice\n"}
    return path, backend, FakeInventory(devices, cgroups)


def run(
    capsys: pytest.CaptureFixture[str], backend: Callable[[], Backend], inventory: Inventory, *argv: str
) -> tuple[int, str, str]:
    try:
        main(list(argv), backend_factory=backend, inventory_factory=lambda: inventory)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_gpus_table_names_each_process_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, backend, inventory = world(tmp_path)
    code, out, err = run(capsys, lambda: backend, inventory, "gpus", "-c", str(path))
    assert (code, err) == (0, "")
    assert "GPU-aaaa" in out and "NVIDIA RTX 4090" in out
    assert "20.0 GiB / 24.0 GiB" in out and "3.0 GiB / 24.0 GiB" in out
    assert "101  qwen  18.0 GiB" in out
    assert "102  whisper  2.0 GiB" in out
    assert "7  -  1.0 GiB" in out


def test_gpus_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, backend, inventory = world(tmp_path)
    code, out, _ = run(capsys, lambda: backend, inventory, "gpus", "--json", "-c", str(path))
    answer = json.loads(out)
    assert code == 0 and answer["reason"] is None
    processes = {p["pid"]: p["model"] for g in answer["gpus"] for p in g["processes"]}
    assert processes == {101: "qwen", 102: "whisper", 7: None}
    assert [g["memory_used"] for g in answer["gpus"]] == [20 * GIB, 3 * GIB]


def test_gpus_without_a_config_shows_no_model_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, inventory = world(tmp_path)

    def no_engine() -> Backend:
        raise AssertionError("no config, so no instance to ask the engine about")

    code, out, _ = run(capsys, no_engine, inventory, "gpus", "--json", "-c", str(tmp_path / "none.yaml"))
    assert code == 0
    assert {p["model"] for g in json.loads(out)["gpus"] for p in g["processes"]} == {None}


@pytest.mark.parametrize("as_json", [False, True])
def test_no_gpu_is_one_line_and_exit_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], as_json: bool
) -> None:
    path, backend, _ = world(tmp_path)
    reason = "no NVIDIA driver found (NVML: NVML Shared Library Not Found)"
    argv = ["gpus", "-c", str(path)] + (["--json"] if as_json else [])
    code, out, err = run(capsys, lambda: backend, FakeInventory(reason=reason), *argv)
    assert (code, err) == (0, "")
    if as_json:
        assert json.loads(out) == {"gpus": [], "reason": reason, "mismatch": []}
    else:
        assert out == f"no GPU: {reason}\n"


def samples(text: str) -> dict[str, float]:
    """The text exposition's samples: series (name and labels) -> value."""
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {series: float(value) for series, value in lines}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_metrics_report_memory_per_device_and_per_model(tmp_path: Path) -> None:
    path, backend, inventory = world(tmp_path)
    upstream = httpx.AsyncClient(transport=backend.transport)
    swapper = Swapper(load_config(path), backend, upstream)
    swapper.metrics.watch_gpus(lambda: read_attributed(inventory, lambda: backend.list("gpu-test")))
    app = build_app(swapper.config, swapper, HttpxUpstream(upstream), swapper.metrics)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://localhost"
    ) as client:
        text = (await client.get("/metrics")).text
    await upstream.aclose()
    found = samples(text)
    assert found['swapctl_gpu_memory_total_bytes{device="0",uuid="GPU-aaaa"}'] == 24 * GIB
    assert found['swapctl_gpu_memory_used_bytes{device="0",uuid="GPU-aaaa"}'] == 20 * GIB
    assert found['swapctl_gpu_memory_used_bytes{device="1",uuid="GPU-bbbb"}'] == 3 * GIB
    assert found['swapctl_model_gpu_memory_bytes{model="qwen"}'] == 18 * GIB
    assert found['swapctl_model_gpu_memory_bytes{model="whisper"}'] == 2 * GIB


@pytest.mark.anyio
async def test_metrics_read_the_inventory_at_each_scrape() -> None:
    reads: list[int] = []
    device = Device(0, "GPU-aaaa", "NVIDIA L4", 24 * GIB, 0, ())
    metrics = Metrics()

    def read() -> Snapshot | NoGpu:
        reads.append(1)
        return read_attributed(FakeInventory((replace(device, memory_used=len(reads) * GIB),)), list)

    metrics.watch_gpus(read)
    assert reads == []  # nothing is read until a scrape
    await metrics.scrape()
    second = samples((await metrics.scrape()).decode())
    assert second['swapctl_gpu_memory_used_bytes{device="0",uuid="GPU-aaaa"}'] == 2 * GIB


def test_no_gpu_gauges_without_an_inventory() -> None:
    assert "swapctl_gpu" not in Metrics().render().decode()
