"""The CLI contract, as other tools and people rely on it: output, JSON shape, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from swapctl.cli import main

SEED = str(Path(__file__).parents[1] / "configs" / "seed.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def run_installed(*argv: str) -> subprocess.CompletedProcess[str]:
    """`python -m swapctl ARGV` as a user runs it. Only here can an error that escapes `main`
    show: in-process it would propagate into the test instead of printing a traceback."""
    command = [sys.executable, "-m", "swapctl", *argv]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_validate_ok(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", "-c", SEED)
    assert code == 0
    assert out.strip() == f"ok: {SEED}: 8 models, matrix with 4 sets (8 combinations)"


def test_validate_error_names_the_key_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(SEED).read_text().replace('creative: "(g | q) & sd"', 'creative: "(g | q) & zz"'))
    code, out, err = run(capsys, "validate", "-c", str(bad))
    assert code == 2
    assert out == ""
    assert err.strip() == (
        "error: matrix.sets.creative: unknown name 'zz' at position 11 in '(g | q) & zz' (not a var nor a model ID)"
    )


def test_config_comes_from_the_environment_then_the_working_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "validate")
    assert code == 2
    assert "swapctl.yaml: no such file" in err
    (tmp_path / "swapctl.yaml").write_text("models: {a: {image: x}}\n")
    assert run(capsys, "validate")[0] == 0
    monkeypatch.setenv("SWAPCTL_CONFIG", SEED)
    assert "8 models" in run(capsys, "validate")[1]


def test_plan_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "sd", "-c", SEED, "--running", "v, gemma", "--json")
    assert code == 0
    assert json.loads(out) == {
        "model": "stable-diffusion",
        "already_running": False,
        "set": "creative",
        "target_set": ["gemma-model", "stable-diffusion"],
        "evict": ["voxtral-model"],
        "cost": 50,
        "candidates": [
            {
                "set": "creative",
                "combination": ["gemma-model", "stable-diffusion"],
                "evict": ["voxtral-model"],
                "cost": 50,
            }
        ],
        "costs": {
            "gemma-model": {"cost": 1, "source": "default"},
            "voxtral-model": {"cost": 50, "source": "evict_costs"},
        },
    }


def test_plan_nothing_running_and_already_running(capsys: pytest.CaptureFixture[str]) -> None:
    plan = json.loads(run(capsys, "plan", "gemma-model", "-c", SEED, "--running", "", "--json")[1])
    assert (plan["set"], plan["evict"], plan["cost"]) == ("standard", [], 0)
    assert [c["set"] for c in plan["candidates"]] == ["standard", "with_rerank", "creative"]
    plan = json.loads(run(capsys, "plan", "g", "-c", SEED, "--running", "g,L", "--json")[1])
    assert plan["already_running"] is True
    assert plan["evict"] == []


def test_plan_model_in_no_set(capsys: pytest.CaptureFixture[str]) -> None:
    plan = json.loads(run(capsys, "plan", "loner", "-c", SEED, "--running", "L,v", "--json")[1])
    assert (plan["set"], plan["target_set"], plan["evict"], plan["cost"]) == (
        None,
        ["loner"],
        ["llama-70B", "voxtral-model"],
        80,
    )


def test_plan_table_shows_candidates(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "g", "-c", SEED, "--running", "q,v")
    assert code == 0
    for text in ("standard", "with_rerank", "creative", "qwen-model", "51", "stop qwen-model (cost 1)"):
        assert text in out


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["plan", "nope", "--running", ""], "unknown model 'nope'"),
        (["plan", "g", "--running", "v,nope"], "unknown model 'nope'"),
    ],
)
def test_plan_unknown_names_exit_2(argv: list[str], named: str) -> None:
    done = run_installed(*argv, "-c", SEED)
    assert "Traceback" not in done.stderr, done.stderr
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("error: ")
    assert named in done.stderr


def test_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "config", "schema")
    assert code == 0
    assert json.loads(out)["title"] == "swapctl configuration"


def test_installed_command_shows_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  a: {image: x\n")
    done = run_installed("validate", "-c", str(bad))
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: {bad}: invalid YAML: line 3")
    assert "Traceback" not in done.stderr


def test_runtime_errors_exit_1_without_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    code, out, err = run(capsys, "status", "-c", SEED, "--url", "http://127.0.0.1:9")
    assert code == 1
    assert out == ""
    assert err.startswith("error: cannot reach the Docker daemon")
    code, _, err = run(capsys, "plan", "g", "-c", SEED, "--url", "http://127.0.0.1:9")
    assert code == 1
    assert "cannot reach the Docker daemon" in err


def test_bad_listen_address(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "up", "-c", SEED, "--listen", "8080")
    assert code == 2
    assert err.strip() == "error: --listen: expected HOST:PORT, got '8080'"


HEAVY = {"docker", "httpx", "aiohttp", "starlette", "uvicorn", "prometheus_client", "rich", "pynvml"}
PROBE = f"""
import sys
from swapctl.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({sorted(HEAVY)!r}))
loaded += sorted(m for m in sys.modules if m.startswith(("swapctl.proxy", "swapctl.lifecycle")))
print("loaded:", *loaded, file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["validate", "-c", SEED],
        ["plan", "g", "-c", SEED, "--running", "q", "--json"],
        ["templates", "show", "vllm"],
    ],
)
def test_quick_commands_load_no_heavy_module(argv: list[str]) -> None:
    """They start fast only while they leave Docker, HTTP, the proxy and rich alone."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=False)
    assert done.stderr.splitlines()[-1] == "loaded:", done.stderr


def test_status_colours_name_lifecycle_states() -> None:
    """The table colours states by name without importing the lifecycle: the names must be its own."""
    from swapctl.cli import STATE_COLOURS
    from swapctl.lifecycle import State

    assert set(STATE_COLOURS) - {"running"} <= {state.value for state in State}
