"""`swapctl validate` and `swapctl plan` against declared GPUs and the models' vram."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import config_file, run_without_engine

CONFIG = """
hardware:
  gpus: [{memory: 24GiB}, {memory: 24GiB}]
models:
  big: {image: x, gpus: 1, vram: 18GiB}
  pair: {image: x, gpus: 2, vram: 10GiB}
  small: {image: x, gpus: ["1"], vram: 4GiB}
  tool: {image: x, gpus: 1}
  cpu: {image: x}
matrix:
  sets:
    coding: "big & small & cpu"
    wide: "pair & (small | tool)"
    greedy: "big & (pair | small)"
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return config_file(tmp_path, CONFIG)


def test_validate_reports_each_combination_that_cannot_fit(
    capsys: pytest.CaptureFixture[str], path: Path
) -> None:
    code, out, err = run_without_engine(capsys, path, "validate")
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        "note: no vram for tool: their GPU memory is not checked",
        "error: matrix.sets.greedy: big + pair cannot run together on the GPUs: they need 38 GiB "
        "(big 18 GiB, pair 10 GiB on each of 2 GPUs); 2 GPUs of 24 GiB, 48 GiB in all",
    ]


def test_validate_all_fitting_is_ok(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    path.write_text(CONFIG.replace('greedy: "big & (pair | small)"', 'greedy: "big & small"'))
    code, out, err = run_without_engine(capsys, path, "validate")
    assert code == 0
    assert out.startswith("ok: ")
    assert "error" not in err


def test_validate_without_hardware_checks_nothing(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    path.write_text(CONFIG.replace("hardware:\n  gpus: [{memory: 24GiB}, {memory: 24GiB}]\n", ""))
    code, out, err = run_without_engine(capsys, path, "validate")
    assert (code, err) == (0, "")
    assert out.startswith("ok: ")


def test_validate_a_bad_size_names_its_key_path(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    path.write_text(CONFIG.replace("{memory: 24GiB}]", "{memory: 24 GiBs}]"))
    code, _, err = run_without_engine(capsys, path, "validate")
    assert code == 2
    assert err.startswith("error: hardware.gpus.1.memory: expected bytes, or a size such as '24GiB'")


def test_plan_shows_memory_before_and_after(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, _ = run_without_engine(capsys, path, "plan", "pair", "--running", "big,small,cpu")
    assert code == 0
    assert "start pair in set 'wide'; stop big, cpu (cost 2)" in out
    assert out.splitlines()[-3:] == [
        "GPU memory, before -> after (a placement that fits, models without vram not counted):",
        "  GPU 0: 18 GiB / 24 GiB (big) -> 10 GiB / 24 GiB (pair)",
        "  GPU 1: 4 GiB / 24 GiB (small) -> 14 GiB / 24 GiB (pair, small)",
    ]


def test_plan_json_has_gpu_memory(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, _ = run_without_engine(capsys, path, "plan", "small", "--running", "", "--json")
    assert code == 0
    memory = json.loads(out)["gpu_memory"]
    assert memory["before"] == [
        {"index": 0, "used": 0, "total": 24 * 2**30, "models": []},
        {"index": 1, "used": 0, "total": 24 * 2**30, "models": []},
    ]
    assert memory["after"][1] == {"index": 1, "used": 4 * 2**30, "total": 24 * 2**30, "models": ["small"]}


def test_plan_without_hardware_shows_no_memory(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    path.write_text(CONFIG.replace("hardware:\n  gpus: [{memory: 24GiB}, {memory: 24GiB}]\n", ""))
    code, out, _ = run_without_engine(capsys, path, "plan", "small", "--running", "big")
    assert code == 0
    assert "GPU memory" not in out
    assert "gpu_memory" not in run_without_engine(capsys, path, "plan", "small", "--running", "", "--json")[1]
