"""The declared GPUs (`hardware.gpus`) checked against the driver's: pure."""

from __future__ import annotations

import pytest

from swapctl.gpus import Device, Mismatch, Snapshot, mismatches

GIB = 2**30
MIB = 2**20
L4 = 23034 * MIB  # what an NVIDIA L4 ("24 GB") reports
RTX_4090 = 24564 * MIB  # 23.99 GiB


def gpus(*totals: int) -> Snapshot:
    return Snapshot(tuple(Device(i, f"GPU-{i}", "NVIDIA L4", total, 0) for i, total in enumerate(totals)))


@pytest.mark.parametrize(
    ("declared", "totals", "found"),
    [
        ((24 * GIB, 24 * GIB), (RTX_4090, RTX_4090), []),  # a card a little under its size
        ((80 * GIB,), (81559 * MIB,), []),  # an H100 reports 79.65 GiB
        ((22 * GIB,), (L4,), []),  # a little under what it has: no note
        (
            (24 * GIB, 48 * GIB),
            (L4, L4),
            [
                Mismatch("hardware.gpus.0.memory", "declared 24 GiB, GPU 0 (NVIDIA L4, GPU-0) has 22.49 GiB"),
                Mismatch("hardware.gpus.1.memory", "declared 48 GiB, GPU 1 (NVIDIA L4, GPU-1) has 22.49 GiB"),
            ],
        ),
        (
            (12 * GIB,),
            (L4,),
            [
                Mismatch(
                    "hardware.gpus.0.memory",
                    "declared 12 GiB, GPU 0 (NVIDIA L4, GPU-0) has 22.49 GiB: planning for less",
                    note=True,
                )
            ],
        ),
        (
            (22 * GIB, 22 * GIB),
            (L4,),
            [Mismatch("hardware.gpus", "declared 2 GPUs, the driver reports 1 (GPU 0: NVIDIA L4)")],
        ),
        (
            (22 * GIB,),
            (L4, 80 * GIB),
            [
                Mismatch(
                    "hardware.gpus",
                    "declared 1 GPU, the driver reports 2 (GPU 0: NVIDIA L4; GPU 1: NVIDIA L4)",
                )
            ],
        ),
    ],
)
def test_declared_gpus_against_the_real_ones(
    declared: tuple[int, ...], totals: tuple[int, ...], found: list[Mismatch]
) -> None:
    assert mismatches(declared, gpus(*totals)) == found


def test_a_mismatch_line_names_its_key_path() -> None:
    [found] = mismatches((48 * GIB,), gpus(L4))
    assert found.line == "hardware.gpus.0.memory: declared 48 GiB, GPU 0 (NVIDIA L4, GPU-0) has 22.49 GiB"
    assert found.to_json() == {"key": "hardware.gpus.0.memory", "message": found.message, "note": False}
