"""Placing a count of GPUs: what a spec asks, which devices it gets, the spec written with
them (its hash untouched), free memory from the driver or the declarations, and what Docker
receives: pure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from docker.models.containers import _create_container_args

from swapctl.backend.docker import create_arguments
from swapctl.config import parse_config
from swapctl.gpus import Device, GpuProcess, Snapshot
from swapctl.lifecycle.placement import (
    Ask,
    ask,
    choose,
    declared_free,
    devices_of,
    measured_free,
    place,
    placing_line,
)
from swapctl.matrix.fit import Footprint
from swapctl.spec import PLACED, ContainerSpec, build_spec, placed_ids

GIB = 2**30


def spec_of(**keys: Any) -> ContainerSpec:
    config = parse_config({"models": {"m": {"image": "img", **keys}}}, base_dir=Path("/srv"), environ={})
    return build_spec(config, "m")


def devices(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"deploy": {"resources": {"reservations": {"devices": list(entries)}}}}


@pytest.mark.parametrize(
    ("keys", "wanted"),
    [
        ({}, None),  # no GPU
        ({"gpus": 1}, Ask(1)),
        ({"gpus": 2}, Ask(2)),
        ({"gpus": "all"}, None),
        ({"gpus": ["1"]}, None),  # pinned: as written
        ({"gpus": ["GPU-aaaa"]}, None),
        (devices({"capabilities": ["gpu"], "count": 1}), Ask(1)),
        (devices({"capabilities": ["gpu"], "count": "all"}), None),
        (devices({"capabilities": ["gpu"]}), None),  # no count: all, as Compose reads it
        (devices({"capabilities": ["gpu"], "device_ids": ["0"]}), None),
        (
            devices({"capabilities": ["gpu"], "device_ids": ["0"]}, {"capabilities": ["gpu"], "count": 1}),
            Ask(1, (0,)),  # one more beside the pinned one
        ),
        (devices({"capabilities": ["tpu"], "count": 1}), None),  # not a GPU
    ],
)
def test_what_a_spec_asks_to_be_placed(keys: dict[str, Any], wanted: Ask | None) -> None:
    assert ask(spec_of(**keys)) == wanted


@pytest.mark.parametrize(
    ("free", "wanted", "chosen"),
    [
        ({0: 2 * GIB, 1: 22 * GIB}, Ask(1), (1,)),
        ({0: 22 * GIB, 1: 2 * GIB}, Ask(1), (0,)),
        ({0: 8 * GIB, 1: 8 * GIB}, Ask(1), (0,)),  # a tie: the lowest index
        ({0: 8 * GIB, 1: 9 * GIB, 2: 8 * GIB, 3: 1 * GIB}, Ask(2), (0, 1)),
        ({0: 1 * GIB, 1: 9 * GIB, 2: 8 * GIB, 3: 10 * GIB}, Ask(2), (1, 3)),  # by index
        ({0: 20 * GIB, 1: 9 * GIB, 2: 8 * GIB}, Ask(1, (0,)), (1,)),  # a pinned one is not chosen again
        ({0: 20 * GIB}, Ask(2), None),  # not that many
        ({0: -2 * GIB, 1: -1 * GIB}, Ask(1), (1,)),  # over-full: still the least over
    ],
)
def test_the_devices_with_the_most_free_memory(
    free: dict[int, int], wanted: Ask, chosen: tuple[int, ...] | None
) -> None:
    assert choose(free, wanted) == chosen


def test_placing_writes_device_ids_and_a_label_but_keeps_the_hash() -> None:
    spec = spec_of(gpus=2)
    placed = place(spec, (1, 3))
    assert placed.gpus == ("1", "3")
    assert placed.spec_hash == spec.spec_hash  # the configured spec's: adoption compares it
    assert placed.labels[PLACED] == "1,3" and placed_ids(placed.labels) == ("1", "3")
    assert placed_ids(spec.labels) == ()


def test_placing_a_compose_count_request_keeps_its_driver_and_options() -> None:
    spec = spec_of(
        **devices(
            {"driver": "nvidia", "capabilities": ["gpu"], "count": 1, "options": {"a": "b"}},
            {"capabilities": ["gpu"], "device_ids": ["0"]},
        )
    )
    placed = place(spec, (2,))
    first, second = placed.device_requests
    assert (first.driver, first.count, first.device_ids, dict(first.options)) == (
        "nvidia",
        None,
        ("2",),
        {"a": "b"},
    )
    assert second == spec.device_requests[1]  # pinned: as written
    assert placed.spec_hash == spec.spec_hash


GPU_REQUEST = {"Driver": "", "Count": 0, "DeviceIDs": ["1"], "Capabilities": [["gpu"]], "Options": {}}


@pytest.mark.parametrize(
    ("keys", "requests"),
    [
        ({"gpus": 1}, [GPU_REQUEST]),
        (
            devices({"driver": "nvidia", "capabilities": ["gpu", "utility"], "count": 1}),
            [{**GPU_REQUEST, "Driver": "nvidia", "Capabilities": [["gpu", "utility"]]}],
        ),
    ],
)
def test_docker_receives_the_placed_device_ids(keys: dict[str, Any], requests: list[dict[str, Any]]) -> None:
    """Through docker-py's own DeviceRequest and HostConfig, as the engine receives them."""
    arguments = create_arguments(place(spec_of(**keys), (1,)))
    host_config = _create_container_args({**arguments, "version": "1.41"})["host_config"]
    assert host_config["DeviceRequests"] == requests
    assert arguments["labels"][PLACED] == "1"


def test_free_memory_measured_is_total_less_used() -> None:
    snapshot = Snapshot(
        (
            Device(0, "GPU-a", "NVIDIA L4", 24 * GIB, 20 * GIB, (GpuProcess(7, 20 * GIB),)),
            Device(1, "GPU-b", "NVIDIA L4", 24 * GIB, 2 * GIB),
        )
    )
    assert measured_free(snapshot) == {0: 4 * GIB, 1: 22 * GIB}


def test_free_memory_declared_is_capacity_less_the_running_footprints() -> None:
    footprints = {"big": Footprint(18 * GIB, 1, (0,)), "pair": Footprint(5 * GIB, 2, ())}
    running = {"big": (0,), "pair": (0, 1), "cpu": (1,)}  # cpu: no declared footprint
    assert declared_free((24 * GIB, 24 * GIB), footprints, running) == {0: 1 * GIB, 1: 19 * GIB}


@pytest.mark.parametrize(
    ("footprint", "placed", "used"),
    [
        (Footprint(GIB, 1, ()), (1,), (1,)),  # where swapctl placed it
        (Footprint(GIB, 1, (0,)), None, (0,)),  # pinned
        (Footprint(GIB, 2, (0, 1)), None, (0, 1)),  # all
        (Footprint(GIB, 1, ()), None, ()),  # Docker chose: unknown
        (None, None, ()),
    ],
)
def test_the_devices_a_running_model_uses(
    footprint: Footprint | None, placed: tuple[int, ...] | None, used: tuple[int, ...]
) -> None:
    assert devices_of(footprint, placed) == used


def test_the_log_line() -> None:
    assert placing_line("chat", (1,), {0: 2 * GIB, 1: 22 * GIB}) == "placing chat on GPU 1 (22 GiB free)"
    free = {0: 20 * GIB, 2: 18 * GIB + GIB // 2}
    assert placing_line("big", (0, 2), free) == "placing big on GPUs 0, 2 (20 GiB, 18.5 GiB free)"
