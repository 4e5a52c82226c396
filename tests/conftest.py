"""Shared fixtures: the real Docker engine and image, tiny GGUF models, and per-test instances.

Tests marked `docker` need the engine and the image `swapctl/llama-server:sid`: the
`docker_engine` fixture makes sure of both (the scripts are idempotent) and FAILS the test
when it cannot; a real-Docker test is never silently skipped.
"""

from __future__ import annotations

import importlib.util
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import docker
import docker.errors
import pytest
from registry import Locked, Registry, serve_locked, serve_registry
from support import Proxy

from swapctl.spec import INSTANCE

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
LLAMA_IMAGE = "swapctl/llama-server:sid"
# models_dir holds seed-N.gguf for each of these seeds: different seeds, different outputs.
MODEL_SEEDS = (1, 2, 3)


def _run_script(name: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            ["bash", str(SCRIPTS / name)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"scripts/{name} did not finish within {timeout:g}s: {error.output!r}", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"scripts/{name} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}", pytrace=False
        )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test carries its folder's marker, so `-m unit` and `-m "not docker"` select."""
    for item in items:
        folder = item.path.parent.name
        if folder in ("unit", "component"):
            item.add_marker(folder)


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Lock files and kept measurements go to a folder of the test session's, never the
    user's (the `swapctl up` processes tests start inherit it); a test that needs its own
    sets SWAPCTL_STATE_DIR again."""
    with pytest.MonkeyPatch.context() as patch:
        folder = tmp_path_factory.mktemp("state")
        patch.setenv("SWAPCTL_STATE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[docker.DockerClient]:
    """A client of a running Docker engine that has the test image; fails the test otherwise."""
    _run_script("docker-engine.sh", timeout=180)
    _run_script("build-llama-image.sh", timeout=600)
    try:
        client = docker.from_env(version="auto", timeout=60)
        client.images.get(LLAMA_IMAGE)
    except docker.errors.DockerException as error:
        pytest.fail(f"the Docker engine or the image {LLAMA_IMAGE} is not usable: {error}", pytrace=False)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _docker_marked_tests_need_the_engine(request: pytest.FixtureRequest) -> None:
    """Every test marked `docker` gets the engine and the image, or fails."""
    if request.node.get_closest_marker("docker") is not None:
        request.getfixturevalue("docker_engine")


def _load_tiny_gguf() -> ModuleType:
    spec = importlib.util.spec_from_file_location("swapctl_tiny_gguf", SCRIPTS / "tiny_gguf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An absolute directory with seed-1.gguf, seed-2.gguf, seed-3.gguf (tiny random llamas)."""
    folder = tmp_path_factory.mktemp("models").resolve()
    write_tiny_model: Callable[[Path, int], None] = _load_tiny_gguf().write_tiny_model
    for seed in MODEL_SEEDS:
        write_tiny_model(folder / f"seed-{seed}.gguf", seed)
    folder.chmod(0o755)  # the containers read it as whatever user they run as
    return folder


def remove_instance_containers(client: docker.DockerClient, name: str) -> list[str]:
    """Remove (force) every container labelled with instance `name` or `name-*`, in any state."""
    removed: list[str] = []
    for _ in range(3):  # a proxy still stopping may be removing some at the same time
        found = [
            c
            for c in client.containers.list(all=True, filters={"label": INSTANCE})
            if (value := (c.labels or {}).get(INSTANCE)) == name or str(value).startswith(f"{name}-")
        ]
        if not found:
            break
        for container in found:
            try:
                container.remove(force=True)
                removed.append(container.name)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as error:
                if "already in progress" not in str(error):
                    raise
    return removed


@pytest.fixture
def instance(request: pytest.FixtureRequest) -> Iterator[str]:
    """A unique instance name, `t-<8 hex>`; `<name>-<suffix>` names belong to it too.

    For tests marked `docker`, every container labelled with these instances is removed
    afterwards, whatever its state (running, exited, `created`).
    """
    name = f"t-{uuid.uuid4().hex[:8]}"
    client: docker.DockerClient | None = None
    if request.node.get_closest_marker("docker") is not None:
        client = request.getfixturevalue("docker_engine")
    yield name
    if client is not None:
        remove_instance_containers(client, name)


@pytest.fixture
def proxies() -> Iterator[list[Proxy]]:
    """`swapctl up` processes a test starts (append them); each is stopped afterwards."""
    started: list[Proxy] = []
    yield started
    for proxy in started:
        proxy.close()


@pytest.fixture(scope="session")
def registry(
    docker_engine: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    """A real registry on 127.0.0.1 serving `registry.image`, which is absent here until a
    test pulls it (`registry.absent()` removes it again); FAILS the test when it cannot start."""
    with serve_registry(docker_engine, tmp_path_factory.mktemp("registry")) as found:
        yield found


@pytest.fixture(scope="session")
def locked_registry(registry: Registry) -> Iterator[Locked]:
    """The same image through a registry that asks for a login; its `docker_config` has it."""
    with serve_locked(registry) as found:
        yield found
