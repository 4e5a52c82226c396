"""The pure parts of the GPU inventory: a container ID from /proc/PID/cgroup, processes
named by their model, memory per model, and the JSON form."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from swapctl.backend import Container
from swapctl.gpus import (
    Device,
    FakeInventory,
    GpuProcess,
    NoGpu,
    NvmlInventory,
    Snapshot,
    parse_container_id,
    read_attributed,
)

ID = "3f2a9c1e5b7d4f60a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718"
OTHER = "9" * 64
GIB = 2**30


@pytest.mark.parametrize(
    ("cgroup", "expected"),
    [
        # cgroup v2, Docker's systemd driver (the default on current distributions)
        (f"0::/system.slice/docker-{ID}.scope\n", ID),
        # cgroup v2, cgroupfs driver
        (f"0::/docker/{ID}\n", ID),
        # cgroup v1, cgroupfs driver: every controller names the container
        (
            f"12:pids:/docker/{ID}\n11:memory:/docker/{ID}\n"
            f"4:cpu,cpuacct:/docker/{ID}\n1:name=systemd:/docker/{ID}\n",
            ID,
        ),
        # cgroup v1, systemd driver
        (f"11:devices:/system.slice/docker-{ID}.scope\n1:name=systemd:/system.slice/docker-{ID}.scope\n", ID),
        # hybrid: v1 controllers plus the unified line
        (f"5:memory:/docker/{ID}\n0::/docker/{ID}\n", ID),
        # Podman, and containerd under Kubernetes
        (f"0::/machine.slice/libpod-{ID}.scope/container\n", ID),
        (f"0::/kubepods.slice/kubepods-burstable.slice/cri-containerd-{ID}.scope\n", ID),
        # processes in no container
        ("0::/user.slice/user-1000.slice/session-2.scope\n", None),
        ("12:pids:/\n11:memory:/user.slice\n0::/init.scope\n", None),
        ("0::/\n", None),
        ("", None),
        # 64 characters that are not all hex, or too short, are no container ID
        ("0::/system.slice/docker-" + "g" * 64 + ".scope\n", None),
        ("0::/docker/3f2a9c1e5b7d\n", None),
    ],
)
def test_container_id_from_cgroup(cgroup: str, expected: str | None) -> None:
    assert parse_container_id(cgroup) == expected


def container(container_id: str, model: str) -> Container:
    return Container(container_id, f"swapctl-{model}", model, "running", 40001, "hash")


SNAPSHOT = (
    Device(
        0,
        "GPU-aaaa",
        "NVIDIA RTX 4090",
        24 * GIB,
        20 * GIB,
        (GpuProcess(101, 18 * GIB), GpuProcess(102, GIB)),
    ),
    Device(
        1, "GPU-bbbb", "NVIDIA RTX 4090", 24 * GIB, 3 * GIB, (GpuProcess(103, 2 * GIB), GpuProcess(104, None))
    ),
)


def inventory() -> FakeInventory:
    return FakeInventory(
        SNAPSHOT,
        cgroups={
            101: f"0::/system.slice/docker-{ID}.scope\n",
            102: "0::/user.slice/user-1000.slice/session-2.scope\n",  # a desktop, not ours
            103: f"0::/system.slice/docker-{ID}.scope\n",  # the same model on a second GPU
            104: f"0::/system.slice/docker-{OTHER}.scope\n",  # a container of another instance
        },
    )


def test_processes_are_named_by_their_model() -> None:
    found = read_attributed(inventory(), lambda: [container(ID, "qwen")])
    assert isinstance(found, Snapshot)
    models = {p.pid: p.model for d in found.devices for p in d.processes}
    assert models == {101: "qwen", 102: None, 103: "qwen", 104: None}
    assert found.memory_by_model() == {"qwen": 20 * GIB}


def test_a_process_gone_before_its_cgroup_is_read_has_no_model() -> None:
    gone = FakeInventory(SNAPSHOT)  # no cgroup text for any PID
    found = read_attributed(gone, lambda: [container(ID, "qwen")])
    assert isinstance(found, Snapshot)
    assert found.memory_by_model() == {}


def test_snapshot_json() -> None:
    found = read_attributed(inventory(), lambda: [container(ID, "qwen")])
    assert json.loads(json.dumps(found.to_json())) == {
        "gpus": [
            {
                "index": 0,
                "uuid": "GPU-aaaa",
                "name": "NVIDIA RTX 4090",
                "memory_total": 24 * GIB,
                "memory_used": 20 * GIB,
                "processes": [
                    {"pid": 101, "memory_used": 18 * GIB, "model": "qwen"},
                    {"pid": 102, "memory_used": GIB, "model": None},
                ],
            },
            {
                "index": 1,
                "uuid": "GPU-bbbb",
                "name": "NVIDIA RTX 4090",
                "memory_total": 24 * GIB,
                "memory_used": 3 * GIB,
                "processes": [
                    {"pid": 103, "memory_used": 2 * GIB, "model": "qwen"},
                    {"pid": 104, "memory_used": None, "model": None},
                ],
            },
        ],
        "reason": None,
    }


def test_no_gpu_reads_no_containers() -> None:
    def containers() -> list[Container]:
        raise AssertionError("the engine was asked although there is no GPU")

    found = read_attributed(FakeInventory(reason="no NVIDIA driver found"), containers)
    assert found == NoGpu("no NVIDIA driver found")
    assert found.to_json() == {"gpus": [], "reason": "no NVIDIA driver found"}


class StubNvml(types.ModuleType):
    """The few NVML calls NvmlInventory makes, as nvidia-ml-py names them, over one device
    (or an error from nvmlDeviceGetCount); records init and shutdown."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, fail: bool = False) -> None:
        super().__init__("pynvml")
        self.fail = fail
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        if self.fail:
            raise self.NVMLError("GPU is lost")
        return 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(total=24 * GIB, used=5 * GIB, free=19 * GIB)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[types.SimpleNamespace]:
        return [
            types.SimpleNamespace(pid=42, usedGpuMemory=4 * GIB),
            types.SimpleNamespace(pid=43, usedGpuMemory=None),
        ]

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return b"GPU-aaaa"  # older bindings answer bytes

    def nvmlDeviceGetName(self, handle: int) -> str:
        return "NVIDIA L4"


def test_nvml_adapter_reads_and_always_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = StubNvml()
    monkeypatch.setitem(sys.modules, "pynvml", stub)
    assert NvmlInventory().read() == Snapshot(
        (
            Device(
                0, "GPU-aaaa", "NVIDIA L4", 24 * GIB, 5 * GIB, (GpuProcess(42, 4 * GIB), GpuProcess(43, None))
            ),
        )
    )
    failing = StubNvml(fail=True)
    monkeypatch.setitem(sys.modules, "pynvml", failing)
    assert NvmlInventory().read() == NoGpu("NVML could not read the GPUs: GPU is lost")
    assert stub.calls == failing.calls == ["init", "shutdown"]


def test_cgroup_of_a_process(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"0::/docker/{ID}\n")
    inventory = NvmlInventory(proc=tmp_path)
    assert inventory.cgroup(42) == f"0::/docker/{ID}\n"
    assert inventory.cgroup(43) is None  # gone
