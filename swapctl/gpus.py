"""The GPU inventory: what each NVIDIA GPU holds, and which of swapctl's models holds it.

One seam, `Inventory`: `read()` gives a frozen `Snapshot` of the devices and the processes on
them, or `NoGpu` with the reason (no driver, no device: a normal case, never an exception);
`cgroup(pid)` gives a process's control groups, where Docker writes its container's ID.
`NvmlInventory` asks the driver through NVML (nvidia-ml-py, imported only when read);
`FakeInventory` ships for tests. The rest is pure: finding a container ID in a cgroup file,
naming each process's model, a container's footprint (what it holds on each device), whether a
stopped container's memory is back, the declared GPUs checked against the real ones, and the
JSON form.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from swapctl.backend.base import Container
from swapctl.matrix.fit import format_gpu_memory


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
    to see that memory come back, and the processes each device listed then: memory held by a
    process that appeared since (another model starting on the same GPU) is not ours."""

    footprint: MeasuredFootprint
    used_before: tuple[tuple[int, int], ...]  # (device index, bytes)
    listed: tuple[tuple[int, frozenset[int]], ...] = ()  # (device index, PIDs); a device absent: unknown
    asleep: bool = False  # put to sleep, not stopped: its processes stay, only its memory comes back


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
    still listed (unless it was put to sleep), or the used memory has not dropped by RELEASED
    of what it held there."""
    ours = release.footprint
    before, held, listed = dict(release.used_before), dict(ours.memory), dict(release.listed)

    def holds(device: Device) -> bool:
        mine = (p.pid in ours.pids or _runs_in(p.pid, ours.container, cgroup) for p in device.processes)
        if not release.asleep and any(mine):
            return True
        if device.index not in held:
            return False  # it held nothing here: another model's start may fill this one
        dropped = before.get(device.index, device.memory_used) - (device.memory_used - arrived(device))
        return dropped < RELEASED * held[device.index]

    def arrived(device: Device) -> int:
        """What processes listed since the stop hold on `device` (they may fill it meanwhile)."""
        known = listed.get(device.index)
        return 0 if known is None else sum(p.memory_used or 0 for p in device.processes if p.pid not in known)

    return tuple(device.index for device in snapshot.devices if holds(device))


def used_by_device(snapshot: Snapshot) -> tuple[tuple[int, int], ...]:
    return tuple((device.index, device.memory_used) for device in snapshot.devices)


def listed_by_device(snapshot: Snapshot) -> tuple[tuple[int, frozenset[int]], ...]:
    return tuple((device.index, frozenset(p.pid for p in device.processes)) for device in snapshot.devices)


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


def rounded(size: int) -> str:
    """Bytes as GiB to two decimals, for sizes the driver reports: `22.49 GiB`, `24 GiB`."""
    return f"{size / 2**30:.2f}".rstrip("0").rstrip(".") + " GiB"


# A card reports a little under its nominal size (a 24 GiB one about 23.99 GiB, an 80 GiB
# H100 79.6 GiB): a declared size up to 1% over the real total is taken as that card. Under
# 90% of it is allowed (planning for less), and said in a note.
OVER_TOLERANCE = 0.01
UNDER_NOTE = 0.9


@dataclass(frozen=True)
class Mismatch:
    """A way the declared GPUs (`hardware.gpus`) differ from the driver's; a `note` is allowed."""

    key: str  # the key path: `hardware.gpus`, `hardware.gpus.1.memory`
    message: str
    note: bool = False

    @property
    def line(self) -> str:
        return f"{self.key}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "message": self.message, "note": self.note}


def mismatches(declared: tuple[int, ...], snapshot: Snapshot) -> list[Mismatch]:
    """The declared GPUs (bytes each, by index) checked against the devices the driver reports:
    another number of GPUs; a declared size over the device's total (beyond OVER_TOLERANCE);
    a note for one well under it."""
    found: list[Mismatch] = []
    if len(declared) != len(snapshot.devices):
        names = "; ".join(f"GPU {d.index}: {d.name}" for d in snapshot.devices)
        message = f"declared {len(declared)} GPU{'s' * (len(declared) != 1)}, the driver reports {len(snapshot.devices)}"
        found.append(Mismatch("hardware.gpus", f"{message} ({names})" if names else message))
    for index, (size, device) in enumerate(zip(declared, snapshot.devices, strict=False)):
        real = f"GPU {device.index} ({device.name}, {device.uuid}) has {rounded(device.memory_total)}"
        text = f"declared {format_gpu_memory(size)}, {real}"
        if size > device.memory_total * (1 + OVER_TOLERANCE):
            found.append(Mismatch(f"hardware.gpus.{index}.memory", text))
        elif size < device.memory_total * UNDER_NOTE:
            found.append(Mismatch(f"hardware.gpus.{index}.memory", f"{text}: planning for less", note=True))
    return found
