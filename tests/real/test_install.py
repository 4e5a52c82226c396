"""swapctl installs like any tool: the wheel and the sdist `python -m build` makes, each
installed by pipx (and the wheel by `uv tool install`) into an environment of its own, with
its dependencies from the package index as a user gets them; then, from a folder outside the
checkout, the installed `swapctl --version`, `swapctl init` and `swapctl validate` on what
init wrote, and the shell completion script; and, with Docker, `swapctl up` serving a chat
from what init wrote. The installs share one download cache. (About a minute: four
environments.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from support import MESSAGES, free_port, poll

import swapctl

pytestmark = pytest.mark.install

ROOT = Path(__file__).resolve().parents[2]
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "swapctl", "compose-templates")


def run(*argv: str | Path, cwd: Path, env: Mapping[str, str] | None = None) -> str:
    """stdout of a command that must succeed; its output in the failure otherwise."""
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    assert done.returncode == 0, f"{' '.join(map(str, argv))} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel and the sdist, built from a copy of the build inputs (nothing lands in the
    checkout)."""
    folder = tmp_path_factory.mktemp("build")
    source = folder / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    run(sys.executable, "-m", "build", "--outdir", folder / "dist", source, cwd=folder)
    return folder / "dist"


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One download cache for every install here: the second finds the dependencies' wheels."""
    return tmp_path_factory.mktemp("cache")


def user_env(home: Path, cache: Path) -> dict[str, str]:
    """The environment of a user whose tools live under `home`: swapctl's checkout nowhere on
    the path, no virtual environment active."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "SWAPCTL_CONFIG")}
    bin_dir = home / "bin"
    env |= {"HOME": str(home), "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin"}
    env |= {"PIPX_HOME": str(home / "pipx"), "PIPX_BIN_DIR": str(bin_dir), "PIPX_MAN_DIR": str(home / "man")}
    env |= {"UV_TOOL_DIR": str(home / "uv-tools"), "UV_TOOL_BIN_DIR": str(bin_dir)}
    env |= {"PIP_CACHE_DIR": str(cache / "pip"), "UV_CACHE_DIR": str(cache / "uv")}
    return env


def check_installed(home: Path, env: Mapping[str, str]) -> None:
    """The installed command, run from a folder outside the checkout, as a user would."""
    command = home / "bin" / "swapctl"
    work = home / "work"
    work.mkdir()
    assert run(command, "--version", cwd=work, env=env) == f"swapctl {swapctl.__version__}\n"
    # the command runs the installed package, not the checkout's
    python = Path(os.path.realpath(command)).parent / "python"
    where = run(python, "-c", "import swapctl; print(swapctl.__file__)", cwd=work, env=env).strip()
    assert Path(where).is_relative_to(home), where
    assert not Path(where).is_relative_to(ROOT)

    models = work / "models"
    models.mkdir()
    (models / "qwen.gguf").write_bytes(b"GGUF")
    out = run(
        command, "init", "--model", "qwen=llama-server:./models/qwen.gguf", "--model", "whisper=speaches",
        cwd=work, env=env,
    )  # fmt: skip
    assert out.startswith("wrote swapctl.yaml: 2 models, ")
    assert f"{models}:/models:ro" in (work / "swapctl.yaml").read_text()
    assert run(command, "validate", cwd=work, env=env).startswith("ok: swapctl.yaml: 2 models, ")
    assert "llama-server" in run(command, "templates", cwd=work, env=env)

    script = run(command, "--show-completion", "bash", cwd=work, env=env)
    assert "complete -o default -F _swapctl_completion swapctl" in script


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_pipx_installs_the_wheel_and_the_sdist(kind: str, dist: Path, cache: Path, tmp_path: Path) -> None:
    [built] = dist.glob(f"swapctl-*.{kind}")
    env = user_env(tmp_path, cache)
    run(sys.executable, "-m", "pipx", "install", "--python", sys.executable, built, cwd=tmp_path, env=env)
    check_installed(tmp_path, env)
    # Typer's --install-completion writes the script where bash reads it, for this user
    env_bash = {**env, "SHELL": "/bin/bash"}
    run(tmp_path / "bin" / "swapctl", "--install-completion", "bash", cwd=tmp_path, env=env_bash)
    assert "swapctl" in (tmp_path / ".bashrc").read_text()


def test_uv_tool_installs_the_wheel(dist: Path, cache: Path, tmp_path: Path) -> None:
    [wheel] = dist.glob("swapctl-*.whl")
    env = user_env(tmp_path, cache)
    uv = Path(sys.executable).parent / "uv"
    run(uv, "tool", "install", "--python", sys.executable, wheel, cwd=tmp_path, env=env)
    check_installed(tmp_path, env)


@pytest.mark.docker
def test_the_installed_swapctl_serves_a_chat(
    dist: Path, cache: Path, tmp_path: Path, docker_engine: object, models_dir: Path, instance: str
) -> None:
    """pipx install, swapctl init with a model file, swapctl up: an OpenAI client's chat."""
    [wheel] = dist.glob("swapctl-*.whl")
    env = user_env(tmp_path, cache)
    run(sys.executable, "-m", "pipx", "install", "--python", sys.executable, wheel, cwd=tmp_path, env=env)
    work, port = tmp_path / "work", free_port()
    work.mkdir()
    command = tmp_path / "bin" / "swapctl"
    model = f"chat=llama-server:{models_dir}/seed-1.gguf"
    run(command, "init", "--model", model, "--listen", f"127.0.0.1:{port}", cwd=work, env=env)
    config = work / "swapctl.yaml"
    config.write_text(f"instance: {instance}\n" + config.read_text())  # removed by the fixture
    with (work / "up.log").open("wb") as log:
        up = subprocess.Popen(
            [command, "up", "--stop-on-exit"], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        health = f"http://127.0.0.1:{port}/health"
        poll(lambda: up.poll() is not None or _answers(health), 30, "swapctl up to answer /health")
        assert up.poll() is None, (work / "up.log").read_text()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        answer = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=4)
        assert answer.choices[0].message.content is not None
        page = httpx.get(f"http://127.0.0.1:{port}/ui", timeout=5)  # with its charts' library inside
        assert page.status_code == 200 and "var uPlot=" in page.text and "data-vendor" not in page.text
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
