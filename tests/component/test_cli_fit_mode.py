"""`swapctl plan` and `swapctl validate` with `matrix: {fit: gpu}`: no sets, the GPUs decide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import config_file, run_cli, run_without_engine

from swapctl.backend.fake import FakeBackend
from swapctl.config import load_config
from swapctl.lifecycle import placement
from swapctl.spec import build_spec

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


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return config_file(tmp_path, CONFIG)


def test_plan_evicts_the_cheapest_that_frees_enough(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, err = run_without_engine(capsys, path, "plan", "pair", "--running", "big,mid,cpu")
    assert (code, err) == (0, "")
    assert "start pair in set 'fit' on GPUs 0, 1; stop big (cost 5)" in out
    assert "GPU 0: 18 GiB / 24 GiB (big) -> 8 GiB / 24 GiB (pair)" in out
    assert "GPU 1: 10 GiB / 24 GiB (mid) -> 18 GiB / 24 GiB (mid, pair)" in out  # mid stays on GPU 1


def test_plan_json(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, _ = run_without_engine(capsys, path, "plan", "mid", "--running", "big,pair", "--json")
    assert code == 0
    decided = json.loads(out)
    assert (decided["set"], decided["evict"], decided["cost"]) == ("fit", ["pair"], 1)
    assert decided["target_set"] == ["big", "mid"]
    after = [gpu["models"] for gpu in decided["gpu_memory"]["after"]]
    assert after in ([["big"], ["mid"]], [["mid"], ["big"]])
    assert [gpu_index for gpu_index, models in enumerate(after) if "mid" in models] == decided["devices"]


def test_validate_summarises_fit_mode(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, out, err = run_without_engine(capsys, path, "validate")
    assert (code, err) == (0, "")
    assert "fit: any models that fit 2 GPUs (48 GiB in all)" in out


def test_a_model_too_big_is_refused_naming_need_and_capacity(
    capsys: pytest.CaptureFixture[str], path: Path
) -> None:
    path.write_text(CONFIG.replace("vram: 18GiB", "vram: 30GiB"))
    code, out, err = run_without_engine(capsys, path, "validate")
    assert (code, out) == (2, "")
    assert err.strip() == (
        "error: models.big.vram: big cannot fit the GPUs even alone: it needs 30 GiB on each of 1 GPU; "
        "the GPUs hold 24 GiB, 24 GiB"
    )


PLACED = """
hardware:
  gpus: [{memory: 24GiB}, {memory: 24GiB}]
models:
  x: {image: x, gpus: 1, vram: 12GiB}
  y: {image: x, gpus: 1, vram: 12GiB}
  z: {image: x, gpus: 1, vram: 24GiB}
matrix:
  fit: gpu
"""


def placed_world(tmp_path: Path) -> tuple[Path, FakeBackend]:
    """The config PLACED, with x's container placed on GPU 0 and y's on GPU 1."""
    path = config_file(tmp_path, PLACED)
    config = load_config(path)
    backend = FakeBackend(gpus=True)
    for model, device in (("x", 0), ("y", 1)):
        backend.start(placement.place(build_spec(config, model), (device,)))
    return path, backend


def test_plan_takes_running_containers_on_the_gpus_they_were_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """x and y (12 GiB each) would share a GPU, but their containers run on GPUs 0 and 1, as
    their labels say: z (a whole GPU) must stop one of them."""
    path, backend = placed_world(tmp_path)
    code, out, _ = run_cli(capsys, lambda: backend, "plan", "z", "--json", "-c", str(path))
    assert code == 0
    assert json.loads(out)["evict"] == ["x"]
    assert json.loads(out)["devices"] == [0]  # where x ran
    unplaced = run_without_engine(capsys, path, "plan", "z", "--running", "x,y", "--json")[1]
    assert json.loads(unplaced)["evict"] == []  # named, not found running: no GPUs known


def test_status_shows_the_gpus_each_container_was_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    path, backend = placed_world(tmp_path)
    code, out, _ = run_cli(capsys, lambda: backend, "status", "-c", str(path), "--url", "http://127.0.0.1:9")
    assert code == 0
    rows = {
        line.split()[1]: line.split()
        for line in out.splitlines()
        if line.split()[1:2] in (["x"], ["y"], ["z"])
    }
    assert "GPU" in out
    assert (rows["x"][-2], rows["y"][-2], rows["z"][-2]) == ("0", "1", "-")
