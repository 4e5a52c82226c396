"""`swapctl plan` and `swapctl validate` with `matrix: {fit: gpu}`: no sets, the GPUs decide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from swapctl.backend import Backend
from swapctl.cli import main

CONFIG = """
hardware:
  gpus: [{memory: 24GiB}, {memory: 24GiB}]
models:
  big: {image: x, gpus: 1, vram: 18GiB}
  mid: {image: x, gpus: 1, vram: 10GiB}
  pair: {image: x, gpus: 2, vram: 8GiB}
  cpu: {image: x}
matrix:
  fit: gpu
  evict_costs: {big: 5}
"""


def no_backend() -> Backend:
    raise AssertionError("--running was given: the engine is not asked")


def run(capsys: pytest.CaptureFixture[str], path: Path, *argv: str) -> tuple[int, str, str]:
    try:
        main([*argv, "-c", str(path)], backend_factory=no_backend)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def path(tmp_path: Path) -> Path:
    written = tmp_path / "swapctl.yaml"
    written.write_text(CONFIG)
    return written


def test_plan_evicts_the_cheapest_that_frees_enough(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, err = run(capsys, path, "plan", "pair", "--running", "big,mid,cpu")
    assert (code, err) == (0, "")
    assert "start pair in set 'fit'; stop big (cost 5)" in out
    assert "GPU 0: 18 GiB / 24 GiB (big) -> " in out


def test_plan_json(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, _ = run(capsys, path, "plan", "mid", "--running", "big,pair", "--json")
    assert code == 0
    decided = json.loads(out)
    assert (decided["set"], decided["evict"], decided["cost"]) == ("fit", ["pair"], 1)
    assert decided["target_set"] == ["big", "mid"]
    assert [gpu["models"] for gpu in decided["gpu_memory"]["after"]] in (
        [["big"], ["mid"]],
        [["mid"], ["big"]],
    )


def test_validate_summarises_fit_mode(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, err = run(capsys, path, "validate")
    assert (code, err) == (0, "")
    assert "fit: any models that fit 2 GPUs (48 GiB in all)" in out


def test_a_model_too_big_is_refused_naming_need_and_capacity(
    capsys: pytest.CaptureFixture[str], path: Path
) -> None:
    path.write_text(CONFIG.replace("vram: 18GiB", "vram: 30GiB"))
    code, out, err = run(capsys, path, "validate")
    assert (code, out) == (2, "")
    assert err.strip() == (
        "error: models.big.vram: big cannot fit the GPUs even alone: it needs 30 GiB on each of 1 GPU; "
        "the GPUs hold 24 GiB, 24 GiB"
    )
