"""The NVML adapter against a real NVIDIA driver. Where this machine has no GPU (or no
driver), the contract tests are skipped, reported as not run, with the reason NVML gave."""

from __future__ import annotations

import os

import pytest

from swapctl.gpus import NoGpu, NvmlInventory, Snapshot, attribute


@pytest.fixture
def snapshot() -> Snapshot:
    found = NvmlInventory().read()
    if isinstance(found, NoGpu):
        pytest.skip(f"no NVIDIA GPU here: {found.reason}")
    return found


def test_nvml_never_raises() -> None:
    """With or without a GPU: a snapshot, or the reason there is none."""
    found = NvmlInventory().read()
    assert isinstance(found, (Snapshot, NoGpu))
    if isinstance(found, NoGpu):
        assert found.reason


def test_devices_are_described(snapshot: Snapshot) -> None:
    assert snapshot.devices
    assert [d.index for d in snapshot.devices] == list(range(len(snapshot.devices)))
    for device in snapshot.devices:
        assert device.uuid.startswith(("GPU-", "MIG-")), device.uuid
        assert device.name
        assert device.memory_total > 0
        assert 0 <= device.memory_used <= device.memory_total
        for process in device.processes:
            assert process.pid > 0
            assert process.memory_used is None or 0 <= process.memory_used <= device.memory_total
    assert len({d.uuid for d in snapshot.devices}) == len(snapshot.devices)


def test_each_read_starts_and_stops_nvml(snapshot: Snapshot) -> None:
    """A second read (after the first one's nvmlShutdown) sees the same devices."""
    again = NvmlInventory().read()
    assert isinstance(again, Snapshot)
    assert [d.uuid for d in again.devices] == [d.uuid for d in snapshot.devices]


def test_processes_outside_swapctl_have_no_model(snapshot: Snapshot) -> None:
    inventory = NvmlInventory()
    assert inventory.cgroup(os.getpid())  # this very process has a cgroup file
    named = attribute(snapshot, [], inventory.cgroup)
    assert named.memory_by_model() == {}
