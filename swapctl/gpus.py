"""The GPU inventory: what each NVIDIA GPU holds, and which of swapctl's models holds it.

One seam, `Inventory`: `read()` gives a frozen `Snapshot` of the devices and the processes on
them, or `NoGpu` with the reason (no driver, no device: a normal case, never an exception);
`cgroup(pid)` gives a process's control groups, where Docker writes its container's ID.
`NvmlInventory` asks the driver through NVML (nvidia-ml-py, imported only when read);
`FakeInventory` ships for tests. The rest is pure: finding a container ID in a cgroup file,
naming each process's model, a container's footprint (what it holds on each device), whether a
stopped container's memory is back, and the JSON form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from swapctl.backend.base import Container


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    memory_used: int | None  # bytes; None where the driver does not say (some containers, MIG)
    model: str | None = None  # the swapctl model whose container runs it, once attributed


@dataclass(frozen=True)
class Device:
    index: int
    uuid: str
    name: str
    memory_total: int  # bytes
    memory_used: int
    processes: tuple[GpuProcess, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    devices: tuple[Device, ...]

    def memory_by_model(self) -> dict[str, int]:
        """Bytes each model's processes hold, over every device."""
        held: dict[str, int] = {}
        for device in self.devices:
            for process in device.processes:
                if process.model is not None:
                    held[process.model] = held.get(process.model, 0) + (process.memory_used or 0)
        return held

    def to_json(self) -> dict[str, Any]:
        return {"gpus": [_device_json(d) for d in self.devices], "reason": None}


@dataclass(frozen=True)
class NoGpu:
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"gpus": [], "reason": self.reason}


def _device_json(device: Device) -> dict[str, Any]:
    return {
        "index": device.index,
        "uuid": device.uuid,
        "name": device.name,
        "memory_total": device.memory_total,
        "memory_used": device.memory_used,
        "processes": [
            {"pid": p.pid, "memory_used": p.memory_used, "model": p.model} for p in device.processes
        ],
    }


class Inventory(Protocol):
    def read(self) -> Snapshot | NoGpu:
        """The devices now; NoGpu (with why) where there is no driver or no device."""
        ...

    def cgroup(self, pid: int) -> str | None:
        """The text of /proc/PID/cgroup; None once the process is gone."""
        ...


# A container ID is 64 hex digits, the last path segment Docker gives it: `/docker/ID`
# (cgroupfs driver), `docker-ID.scope` (systemd driver), likewise `libpod-`, `cri-containerd-`
CONTAINER_ID = re.compile(r"(?:^|[/-])([0-9a-f]{64})(?:\.scope)?$")


def parse_container_id(cgroup: str) -> str | None:
    """The container ID in a /proc/PID/cgroup text (v1 `N:controllers:/path` lines or the
    v2 `0::/path` line), or None for a process in no container."""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1].strip()
        for segment in reversed(path.split("/")):
            found = CONTAINER_ID.search(segment)
            if found:
                return found.group(1)
    return None


def attribute(
    snapshot: Snapshot, containers: Iterable[Container], cgroup: Callable[[int], str | None]
) -> Snapshot:
    """The snapshot with each process named by the model whose container runs it."""
    models = {c.id: c.model for c in containers}

    def model_of(pid: int) -> str | None:
        text = cgroup(pid)
        found = parse_container_id(text) if text else None
        return models.get(found) if found else None

    return Snapshot(
        tuple(
            replace(d, processes=tuple(replace(p, model=model_of(p.pid)) for p in d.processes))
            for d in snapshot.devices
        )
    )


@dataclass(frozen=True)
class MeasuredFootprint:
    """What one container's processes held on each GPU, measured once it was ready."""

    container: str  # its ID
    memory: tuple[tuple[int, int], ...]  # (device index, bytes), by index
    pids: frozenset[int]

    def to_json(self) -> dict[str, int]:
        return {str(index): held for index, held in self.memory}


@dataclass(frozen=True)
class Release:
    """A container stopped with its footprint: each device's used memory just before the stop,
    to see that memory come back."""

    footprint: MeasuredFootprint
    used_before: tuple[tuple[int, int], ...]  # (device index, bytes)


RELEASED = 0.9  # the share of a device's footprint whose return counts as the memory being back


def measured_footprint(
    snapshot: Snapshot, container: str, cgroup: Callable[[int], str | None]
) -> MeasuredFootprint | None:
    """What `container`'s processes hold on each device; None where it has none on any GPU."""
    memory: dict[int, int] = {}
    pids: set[int] = set()
    for device in snapshot.devices:
        for process in device.processes:
            if _runs_in(process.pid, container, cgroup):
                memory[device.index] = memory.get(device.index, 0) + (process.memory_used or 0)
                pids.add(process.pid)
    return MeasuredFootprint(container, tuple(sorted(memory.items())), frozenset(pids)) if pids else None


def still_held(release: Release, snapshot: Snapshot, cgroup: Callable[[int], str | None]) -> tuple[int, ...]:
    """The devices where a stopped container's memory is not back yet: one of its processes is
    still listed, or the used memory has not dropped by RELEASED of what it held there."""
    ours = release.footprint
    before, held = dict(release.used_before), dict(ours.memory)

    def holds(device: Device) -> bool:
        if any(p.pid in ours.pids or _runs_in(p.pid, ours.container, cgroup) for p in device.processes):
            return True
        if device.index not in held:
            return False  # it held nothing here: another model's start may fill this one
        dropped = before.get(device.index, device.memory_used) - device.memory_used
        return dropped < RELEASED * held[device.index]

    return tuple(device.index for device in snapshot.devices if holds(device))


def used_by_device(snapshot: Snapshot) -> tuple[tuple[int, int], ...]:
    return tuple((device.index, device.memory_used) for device in snapshot.devices)


def _runs_in(pid: int, container: str, cgroup: Callable[[int], str | None]) -> bool:
    text = cgroup(pid)
    return text is not None and parse_container_id(text) == container


def read_cgroup(pid: int, proc: Path = Path("/proc")) -> str | None:
    try:
        return (proc / str(pid) / "cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


class NvmlInventory:
    """NVIDIA's driver, asked through NVML at each read (init, read, shutdown)."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc

    def read(self) -> Snapshot | NoGpu:
        try:
            import pynvml
        except ImportError:
            return NoGpu("nvidia-ml-py is not installed (pip install nvidia-ml-py)")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as error:
            return NoGpu(f"no NVIDIA driver found (NVML: {error})")
        try:
            count = pynvml.nvmlDeviceGetCount()
            if count == 0:
                return NoGpu("no NVIDIA GPU found (the driver reports none)")
            return Snapshot(tuple(_device(pynvml, index) for index in range(count)))
        except pynvml.NVMLError as error:
            return NoGpu(f"NVML could not read the GPUs: {error}")
        finally:
            pynvml.nvmlShutdown()

    def cgroup(self, pid: int) -> str | None:
        return read_cgroup(pid, self.proc)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older NVML bindings give bytes


def _device(pynvml: Any, index: int) -> Device:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        running = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError_NotSupported:
        running = []
    return Device(
        index=index,
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        memory_total=int(memory.total),
        memory_used=int(memory.used),
        processes=tuple(GpuProcess(int(p.pid), _bytes(p.usedGpuMemory)) for p in running),
    )


def _bytes(value: int | None) -> int | None:
    return None if value is None else int(value)


@dataclass
class FakeInventory:
    """Devices as given, or `NoGpu(reason)` when `reason` is set; `cgroups` maps a PID to
    the text its /proc/PID/cgroup would hold."""

    devices: tuple[Device, ...] = ()
    cgroups: Mapping[int, str] = field(default_factory=dict)
    reason: str | None = None

    def read(self) -> Snapshot | NoGpu:
        return NoGpu(self.reason) if self.reason is not None else Snapshot(self.devices)

    def cgroup(self, pid: int) -> str | None:
        return self.cgroups.get(pid)


def read_attributed(inventory: Inventory, containers: Callable[[], list[Container]]) -> Snapshot | NoGpu:
    """The inventory now, each process named by its model; `containers` is only asked when
    a GPU exists."""
    found = inventory.read()
    if isinstance(found, NoGpu):
        return found
    return attribute(found, containers(), inventory.cgroup)
