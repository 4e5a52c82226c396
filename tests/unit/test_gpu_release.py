"""A container's measured footprint, and whether a stopped container's memory is back: pure."""

from __future__ import annotations

from dataclasses import replace

import pytest

from swapctl.gpus import (
    Device,
    GpuProcess,
    MeasuredFootprint,
    Release,
    Snapshot,
    measured_footprint,
    still_held,
)

GIB = 2**30
OURS = "a" * 64
THEIRS = "b" * 64
CGROUPS = {10: f"0::/docker/{OURS}\n", 11: f"0::/docker/{OURS}\n", 20: f"0::/docker/{THEIRS}\n"}


def device(index: int, used: int, *processes: GpuProcess) -> Device:
    return Device(index, f"GPU-{index}", "NVIDIA L4", 24 * GIB, used, processes)


def test_a_footprint_sums_the_container_processes_per_device() -> None:
    snapshot = Snapshot(
        (
            device(0, 9 * GIB, GpuProcess(10, 4 * GIB), GpuProcess(11, 2 * GIB), GpuProcess(20, 3 * GIB)),
            device(1, 1 * GIB, GpuProcess(11, None)),  # the driver does not say: counted as 0
            device(2, 5 * GIB, GpuProcess(20, 5 * GIB)),
        )
    )
    found = measured_footprint(snapshot, OURS, CGROUPS.get)
    assert found == MeasuredFootprint(OURS, ((0, 6 * GIB), (1, 0)), frozenset({10, 11}))
    assert found.to_json() == {"0": 6 * GIB, "1": 0}
    assert measured_footprint(snapshot, "c" * 64, CGROUPS.get) is None


RELEASE = Release(MeasuredFootprint(OURS, ((0, 10 * GIB),), frozenset({10})), ((0, 12 * GIB), (1, 2 * GIB)))


@pytest.mark.parametrize(
    ("devices", "held"),
    [
        ((device(0, 2 * GIB), device(1, 2 * GIB)), ()),  # all back
        ((device(0, 3 * GIB), device(1, 2 * GIB)), ()),  # 9 GiB of 10 back: enough
        ((device(0, 3 * GIB + 1), device(1, 2 * GIB)), (0,)),  # just under 90%
        ((device(0, 12 * GIB), device(1, 2 * GIB)), (0,)),  # the driver has not let go yet
        ((device(0, 2 * GIB, GpuProcess(10, 10 * GIB)), device(1, 2 * GIB)), (0,)),  # still listed
        ((device(0, 2 * GIB), device(1, 2 * GIB, GpuProcess(11, GIB))), (1,)),  # a process of ours
        ((device(0, 2 * GIB), device(1, 9 * GIB, GpuProcess(20, 7 * GIB))), ()),  # another container
    ],
)
def test_memory_is_back_once_the_processes_are_gone_and_most_of_it_is_free(
    devices: tuple[Device, ...], held: tuple[int, ...]
) -> None:
    assert still_held(RELEASE, Snapshot(devices), CGROUPS.get) == held


# ours (10 GiB on GPU 0) stopped while pid 7 (outside any container, 2 GiB) ran there
LISTED = Release(RELEASE.footprint, ((0, 12 * GIB),), ((0, frozenset({10, 7})),))
NEWCOMER = GpuProcess(20, 6 * GIB)  # another model's, started since the stop


@pytest.mark.parametrize(
    ("device_now", "held"),
    [
        (device(0, 2 * GIB, GpuProcess(7, 2 * GIB)), ()),
        (device(0, 8 * GIB, GpuProcess(7, 2 * GIB), NEWCOMER), ()),
        (device(0, 9 * GIB + GIB // 2, GpuProcess(7, 2 * GIB), NEWCOMER), (0,)),  # 1.5 GiB not back
        (device(0, 8 * GIB, GpuProcess(7, 8 * GIB)), (0,)),  # listed then, grown since: may be ours
        (device(0, 8 * GIB, GpuProcess(7, 2 * GIB), GpuProcess(20, None)), (0,)),  # its size unknown
    ],
)
def test_memory_held_by_processes_that_came_since_the_stop_is_not_ours(
    device_now: Device, held: tuple[int, ...]
) -> None:
    assert still_held(LISTED, Snapshot((device_now,)), CGROUPS.get) == held
    if held == () and device_now.memory_used > 2 * GIB:  # without the list it would look held
        assert still_held(replace(LISTED, listed=()), Snapshot((device_now,)), CGROUPS.get) == (0,)
