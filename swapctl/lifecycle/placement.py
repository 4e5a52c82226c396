"""PURE: which GPUs a model asking for a count of them gets, fixed when its container is made.

Docker gives a count request (`gpus: 1`, or Compose's `count: 1` device request) whatever
devices it likes; swapctl chooses instead the devices with the most free memory after the
model's evictions (ties: the lowest index) and writes their IDs into the request. `all` and
device IDs are left as written. Free memory comes from the driver, or, where there is none,
from the declared GPUs less the `vram` of the models running on each.

The placed IDs are also written in a label, so that a container adopted after a restart
still says where it runs; the spec hash stays the configured spec's own, so placing never
makes a container look outdated.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from swapctl.gpus import Snapshot, rounded
from swapctl.matrix.fit import Footprint
from swapctl.spec import PLACED, ContainerSpec


@dataclass(frozen=True)
class Ask:
    """A spec's GPU request where swapctl chooses: `count` devices, none of the `pinned` ones."""

    count: int
    pinned: tuple[int, ...] = ()


def ask(spec: ContainerSpec) -> Ask | None:
    """What the spec asks to be placed; None where there is nothing to choose (no GPU, `all`,
    device IDs only)."""
    counts: list[int] = []
    ids: list[str] = []
    if spec.gpus == "all":
        return None
    if isinstance(spec.gpus, int):
        counts.append(spec.gpus)
    elif isinstance(spec.gpus, tuple):
        ids += spec.gpus
    for request in spec.device_requests:
        if "gpu" not in request.capabilities:
            continue
        if request.device_ids:
            ids += request.device_ids
        elif request.count is None or request.count < 0:
            return None  # all of them
        else:
            counts.append(request.count)
    if not sum(counts):
        return None
    return Ask(sum(counts), tuple(sorted({int(i) for i in ids if i.isdigit()})))


def choose(free: Mapping[int, int], wanted: Ask) -> tuple[int, ...] | None:
    """The `wanted.count` devices with the most free bytes (ties: the lowest index), by index,
    leaving out the pinned ones; None where there are not that many."""
    devices = sorted((index for index in free if index not in wanted.pinned), key=lambda i: (-free[i], i))
    if len(devices) < wanted.count:
        return None
    return tuple(sorted(devices[: wanted.count]))


def place(spec: ContainerSpec, devices: tuple[int, ...]) -> ContainerSpec:
    """The spec with its count requests given `devices` by ID, in order, and the label that
    says so; its spec hash label unchanged."""
    ids = [str(index) for index in devices]

    def take(count: int) -> tuple[str, ...]:
        taken = tuple(ids[:count])
        del ids[:count]
        return taken

    gpus = take(spec.gpus) if isinstance(spec.gpus, int) else spec.gpus
    requests = tuple(
        replace(r, count=None, device_ids=take(r.count))
        if "gpu" in r.capabilities and not r.device_ids and r.count
        else r
        for r in spec.device_requests
    )
    labels = {**spec.labels, PLACED: ",".join(map(str, devices))}
    return replace(spec, gpus=gpus, device_requests=requests, labels=labels)


def measured_free(snapshot: Snapshot) -> dict[int, int]:
    """Each device's free bytes as the driver reports them."""
    return {device.index: device.memory_total - device.memory_used for device in snapshot.devices}


def declared_free(
    capacities: tuple[int, ...], footprints: Mapping[str, Footprint], running: Mapping[str, Collection[int]]
) -> dict[int, int]:
    """Each declared GPU's memory less the `vram` of the `running` models on it (model -> the
    devices it uses); a model with no declared footprint counts as holding nothing."""
    return less_declared(dict(enumerate(capacities)), footprints, running)


def less_declared(
    free: Mapping[int, int], footprints: Mapping[str, Footprint], running: Mapping[str, Collection[int]]
) -> dict[int, int]:
    """`free` (device -> bytes) less the `vram` of the `running` models on each device."""
    free = dict(free)
    for model, devices in running.items():
        found = footprints.get(model)
        for index in devices:
            if found is not None and index in free:
                free[index] -= found.vram
    return free


def devices_of(footprint: Footprint | None, placed: tuple[int, ...] | None) -> tuple[int, ...]:
    """The devices a running model uses, as far as known: where swapctl placed it, else those
    its request pins (`all` pins every one); a count Docker placed is unknown."""
    if placed:
        return placed
    return footprint.pinned if footprint is not None else ()


def placing_line(model: str, devices: tuple[int, ...], free: Mapping[int, int]) -> str:
    """`placing chat on GPU 1 (22 GiB free)`, or `on GPUs 0, 2 (20 GiB, 18.5 GiB free)`."""
    where = ", ".join(map(str, devices))
    sizes = ", ".join(rounded(max(free[index], 0)) for index in devices)
    return f"placing {model} on GPU{'s' * (len(devices) > 1)} {where} ({sizes} free)"
