"""GPU memory: the size parser, the footprint of a model's GPU request, the exact placement
search, and the check of every set combination against the declared GPUs."""

from __future__ import annotations

from typing import Any

import pytest

from swapctl.config import parse_config
from swapctl.config.hardware import fit_problems, gpu_count
from swapctl.config.scalars import MAX_GPU_MEMORY, format_gpu_memory, parse_gpu_memory
from swapctl.config.service import DeviceRequest
from swapctl.errors import ConfigError
from swapctl.matrix import compile_matrix
from swapctl.matrix.fit import Footprint, Misfit, check, place, use

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("24GiB", 24 * GiB),
        ("24G", 24 * GiB),
        ("24gb", 24 * GiB),
        ("24000MiB", 24000 * 2**20),
        ("1.5GiB", 3 * GiB // 2),
        ("512K", 512 * 2**10),
        ("1TiB", 2**40),
        ("100", 100),
        ("100b", 100),
        (4096, 4096),
    ],
)
def test_gpu_memory_sizes(text: object, size: int) -> None:
    assert parse_gpu_memory(text) == size


@pytest.mark.parametrize("bad", ["", "24 GB GB", "GiB", "-1G", "24X", "2TiB", 0, -5, True, 1.5, None, [24]])
def test_gpu_memory_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_gpu_memory(bad)


def test_gpu_memory_bound() -> None:
    assert parse_gpu_memory(MAX_GPU_MEMORY) == MAX_GPU_MEMORY
    with pytest.raises(ValueError, match="1024 GiB"):
        parse_gpu_memory(MAX_GPU_MEMORY + 1)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (24 * GiB, "24 GiB"),
        (3 * GiB // 2, "1.5 GiB"),
        (24000 * 2**20, "24000 MiB"),
        (24 * GiB + 1, "25769803777 bytes"),
    ],
)
def test_format_is_exact(size: int, text: str) -> None:
    assert format_gpu_memory(size) == text


def config(**extra: Any) -> dict[str, Any]:
    return {"models": {"a": {"image": "x", "gpus": 1, "vram": "18GiB"}}, **extra}


@pytest.mark.parametrize(
    ("document", "path"),
    [
        (
            config(hardware={"gpus": [{"memory": "24GiB"}, {"memory": "24 parsecs"}]}),
            "hardware.gpus.1.memory",
        ),
        (config(hardware={"gpus": [{}]}), "hardware.gpus.0.memory"),
        (config(hardware={"gpus": [{"memory": "1G", "uuid": "x"}]}), "hardware.gpus.0.uuid"),
        ({"models": {"a": {"image": "x", "vram": "lots"}}}, "models.a.vram"),
        ({"models": {"a": {"image": "x", "vram": 0}}}, "models.a.vram"),
    ],
)
def test_bad_sizes_name_their_key_path(document: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(document, environ={})
    assert error.value.path == path


def test_config_holds_gpus_and_footprints() -> None:
    parsed = parse_config(config(hardware={"gpus": [{"memory": "24GiB"}, {"memory": 16 * GiB}]}), environ={})
    assert parsed.gpu_memory == (24 * GiB, 16 * GiB)
    assert parsed.models["a"].vram == 18 * GiB
    assert parsed.footprints == {"a": Footprint(18 * GiB, 1)}
    assert parse_config(config(), environ={}).gpu_memory is None


def gpu(
    count: int | None = None, ids: tuple[str, ...] = (), capabilities: tuple[str, ...] = ("gpu",)
) -> DeviceRequest:
    return DeviceRequest("nvidia", count, ids, capabilities)


@pytest.mark.parametrize(
    ("gpus", "requests", "counted"),
    [
        (None, (), (0, ())),
        (2, (), (2, ())),
        ("all", (), (4, (0, 1, 2, 3))),
        (("1", "3"), (), (2, (1, 3))),
        (("GPU-5a1b",), (), (1, ())),
        (None, (gpu(2),), (2, ())),
        (None, (gpu(-1),), (4, (0, 1, 2, 3))),
        (None, (gpu(None, ("0",)),), (1, (0,))),
        (None, (gpu(2, capabilities=("compute",)),), (0, ())),
    ],
)
def test_gpu_count(
    gpus: Any, requests: tuple[DeviceRequest, ...], counted: tuple[int, tuple[int, ...]]
) -> None:
    assert gpu_count(gpus, requests, 4) == counted


@pytest.mark.parametrize(
    ("capacities", "footprints", "fits"),
    [
        ((24,), {}, True),
        ((), {}, True),
        ((), {"a": Footprint(1, 1)}, False),
        ((24,), {"a": Footprint(24, 1)}, True),
        ((24,), {"a": Footprint(25, 1)}, False),  # by one byte
        ((24,), {"a": Footprint(12, 1), "b": Footprint(12, 1)}, True),
        ((24,), {"a": Footprint(12, 1), "b": Footprint(13, 1)}, False),
        # a model on two GPUs needs two distinct devices, however free one is
        ((48,), {"a": Footprint(10, 2)}, False),
        ((24, 24), {"a": Footprint(10, 2), "b": Footprint(14, 1)}, True),
        ((24, 24), {"a": Footprint(10, 2), "b": Footprint(15, 1)}, False),
        # first fit would put b beside a on the bigger GPU; the search finds the other way
        ((30, 20), {"a": Footprint(12, 1), "b": Footprint(12, 1), "c": Footprint(18, 1)}, True),
        (
            (20, 10, 10),
            {"a": Footprint(10, 1), "b": Footprint(10, 1), "c": Footprint(10, 1), "d": Footprint(10, 1)},
            True,
        ),
        ((20, 10, 10), {"a": Footprint(10, 2), "b": Footprint(10, 2), "c": Footprint(10, 1)}, False),
        # pinned devices are honoured, even when another device has room
        ((24, 24), {"a": Footprint(18, 1, (1,)), "b": Footprint(8, 1, (1,))}, False),
        ((24, 24), {"a": Footprint(18, 1, (1,)), "b": Footprint(8, 1)}, True),
        ((24, 24), {"a": Footprint(18, 1, (0,)), "b": Footprint(8, 2)}, False),
        ((24,), {"a": Footprint(1, 1, (1,))}, False),  # pinned to a device not declared
    ],
)
def test_place(capacities: tuple[int, ...], footprints: dict[str, Footprint], fits: bool) -> None:
    placement = place(capacities, footprints)
    assert (placement is not None) == fits
    if placement is None:
        return
    for name, devices in placement.items():
        assert len(set(devices)) == footprints[name].count
        assert set(footprints[name].pinned) <= set(devices)
    for index, capacity in enumerate(capacities):
        assert sum(footprints[m].vram for m, devices in placement.items() if index in devices) <= capacity


def test_use_per_device() -> None:
    footprints = {"a": Footprint(18, 1, (1,)), "b": Footprint(4, 2)}
    devices = use((24, 24), footprints, ["a", "b", "cpu-only"])
    assert devices is not None
    assert [(d.used, d.total, d.models) for d in devices] == [(4, 24, ("b",)), (22, 24, ("a", "b"))]
    assert use((24, 24), {"a": Footprint(25, 1)}, ["a"]) is None


MODELS = ("a", "b", "c", "d")


def test_check_names_the_set_that_cannot_fit() -> None:
    program = compile_matrix({}, {}, {"small": "a & d", "big": "a & (b | c) & d"}, MODELS)
    footprints = {"a": Footprint(18, 1), "b": Footprint(6, 1), "c": Footprint(7, 1)}
    report = check((24,), footprints, program)
    assert report.misfits == (Misfit("big", ("a", "c", "d"), 25, 24),)


def test_check_all_fitting_says_nothing() -> None:
    program = compile_matrix({}, {}, {"s": "a & (b | c)", "t": "+s & d"}, MODELS)
    footprints = {"a": Footprint(18, 1), "b": Footprint(6, 1), "c": Footprint(6, 1, (0,))}
    assert check((24,), footprints, program).misfits == ()


def test_check_a_model_alone_once_not_in_every_combination() -> None:
    program = compile_matrix({}, {}, {"s": "a & (b | c)"}, MODELS)
    report = check((24, 24), {"a": Footprint(8, 3), "b": Footprint(1, 1)}, program)
    assert report.misfits == (Misfit(None, ("a",), 24, 48),)


def test_fit_problems_only_with_hardware_and_vram() -> None:
    document = {
        "hardware": {"gpus": [{"memory": "24GiB"}]},
        "models": {
            "a": {"image": "x", "gpus": 1, "vram": "18GiB"},
            "b": {"image": "x", "gpus": [0], "vram": "7GiB"},
            "c": {"image": "x", "gpus": 1},
            "d": {"image": "x", "vram": "1GiB"},
        },
        "matrix": {"sets": {"ok": "a & (c | d)", "full": "a & b & c"}},
    }
    errors, notes = fit_problems(parse_config(document, environ={}))
    assert errors == [
        "matrix.sets.full: a + b + c cannot run together on the GPUs: they need 25 GiB (a 18 GiB, "
        "b 7 GiB on GPU 0); 1 GPU of 24 GiB, 24 GiB in all"
    ]
    assert notes == [
        "no vram for c: their GPU memory is not checked",
        "vram given but no GPU asked for (gpus: or deploy.resources): d",
    ]
    assert fit_problems(parse_config({**document, "hardware": None}, environ={})) == ([], [])
