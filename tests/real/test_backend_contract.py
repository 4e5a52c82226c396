"""One contract, two backends: what the swapper relies on holds for the real Docker backend
and for the in-memory fake alike. A case that passes on Docker and fails on the fake means
the fake lies (fix the fake); the reverse means the Docker backend is wrong.

The Docker backend is held to it three ways: on the local engine, and on a second real
engine in a network namespace of its own (tests/engines.py), as another machine's engine is
reached: over TCP with mutual TLS, and over ssh. Its containers are reached on its address."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import pytest
from engines import SecondEngine

from swapctl.backend import Backend, Container
from swapctl.backend.docker import DockerBackend
from swapctl.backend.fake import FakeBackend, FakeImage, FakeModel
from swapctl.backend.lines import LONGEST_LINE
from swapctl.backend.progress import LayerReport
from swapctl.config import Config, parse_config
from swapctl.errors import GpuUnavailable, ImageMissing, PullFailed
from swapctl.spec import ContainerSpec, build_spec

IMAGE = "swapctl/llama-server:sid"
MISSING_IMAGE = "swapctl-test/no-such-image:never-built"
LLAMA = ["--host", "0.0.0.0", "--port", "8080", "-m", "/models/seed-1.gguf", "-c", "512"]
CHATTY = "echo first; head -c 100000 /dev/zero | tr '\\0' x; echo; echo last"  # then exits


def _config(instance: str, models_dir: Path, base_dir: Path) -> Config:
    server = {
        "image": IMAGE,
        "entrypoint": ["llama-server"],
        "command": LLAMA,
        "volumes": [f"{models_dir}:/models:ro"],
        "environment": {"LLAMA_ARG_THREADS": "1"},
        "stop_grace_period": "2s",
    }
    return parse_config(
        {
            "instance": instance,
            "models": {
                "tiny": server,
                "ghost": {**server, "image": MISSING_IMAGE},
                "gpu": {**server, "gpus": "all"},
                "boom": {"image": IMAGE, "entrypoint": ["sh", "-c"], "command": ["echo boom >&2; exit 3"]},
                "chatty": {"image": IMAGE, "entrypoint": ["sh", "-c"], "command": [CHATTY]},
            },
        },
        base_dir=base_dir,
    )


LOCAL_ENGINES = ["fake", pytest.param("docker", marks=pytest.mark.docker)]


@pytest.fixture(scope="module")
def second(docker_engine: docker.DockerClient) -> Iterator[SecondEngine]:
    """Another machine's engine, with the test image, shared by this module's tests."""
    with SecondEngine.start(image=IMAGE) as engine:
        yield engine


@pytest.fixture(
    params=[
        *LOCAL_ENGINES,
        pytest.param("docker-tls", marks=pytest.mark.docker),
        pytest.param("docker-ssh", marks=pytest.mark.docker),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param == "fake":
        yield FakeBackend(images={IMAGE}, gpus=False)  # this machine: one image, no GPU runtime
        return
    if request.param == "docker":
        yield DockerBackend()
        return
    second: SecondEngine = request.getfixturevalue("second")
    if request.param == "docker-tls":
        remote = DockerBackend(second.tls_engine())
    else:
        remote = DockerBackend(second.ssh_engine())
        with second.ssh_user():  # the SDK reads ~/.ssh (key, known host) as it connects
            assert answers(remote), "the second engine does not answer over ssh"
    try:
        yield remote
    finally:
        remote.close()  # each test's ssh connection ends with it, not at garbage collection
        second.remove_containers()


def answers(backend: DockerBackend, tries: int = 3) -> bool:
    """Whether the engine answers a ping, asked up to `tries` times (each within the engine's
    timeout): on a loaded machine an ssh handshake can be slow once."""
    for _ in range(tries):
        if backend.ping():
            return True
        backend.close()  # a fresh connection for the next try
    return False


def _address(backend: Backend) -> str:
    """Where the backend's containers are reached: the engine's address, the fake's loopback."""
    return backend.engine.address if isinstance(backend, DockerBackend) else "127.0.0.1"


@pytest.fixture
def specs(instance: str, models_dir: Path, tmp_path: Path) -> Callable[[str], ContainerSpec]:
    config = _config(instance, models_dir, tmp_path)
    return lambda model: build_spec(config, model)


def _same(a: Container, b: Container) -> None:
    """Equal but for started_at, which Docker's list gives to the second only."""
    assert (a.id, a.name, a.model, a.state, a.host_port, a.spec_hash, a.image_id) == (
        b.id,
        b.name,
        b.model,
        b.state,
        b.host_port,
        b.spec_hash,
        b.image_id,
    )
    assert a.started_at is not None and b.started_at is not None
    assert abs(a.started_at - b.started_at) < 2


def _wait_stopped(backend: Backend, container_id: str, timeout: float = 10) -> Container:
    deadline = time.monotonic() + timeout
    while True:
        current = backend.get(container_id)
        assert current is not None, "the container vanished by itself"
        if not current.running or time.monotonic() > deadline:
            return current
        time.sleep(0.02)


def _crash(backend: Backend, container: Container) -> None:
    """The container dies by itself (a crash, an out-of-memory kill)."""
    if isinstance(backend, FakeBackend):
        backend.crash(container.model)
    else:
        assert isinstance(backend, DockerBackend)
        backend.client.containers.get(container.id).kill()
    assert not _wait_stopped(backend, container.id).running


def test_start_gives_a_running_container(backend: Backend, specs: Callable[[str], ContainerSpec]) -> None:
    spec = specs("tiny")
    began = time.time()
    container = backend.start(spec)
    assert container.running and container.state == "running"
    assert isinstance(container.host_port, int) and 0 < container.host_port < 65536
    assert container.url == f"http://{_address(backend)}:{container.host_port}"
    assert container.model == "tiny"
    assert container.name == spec.name
    assert container.spec_hash == spec.spec_hash
    assert container.started_at is not None and abs(container.started_at - began) < 10
    assert container.image_id and container.image_id == backend.image_id(spec.image)


def test_list_and_get_show_exactly_it(backend: Backend, specs: Callable[[str], ContainerSpec]) -> None:
    spec = specs("tiny")
    container = backend.start(spec)
    listed = backend.list(spec.instance)
    assert len(listed) == 1
    _same(listed[0], container)
    got = backend.get(container.id)
    assert got is not None
    _same(got, container)


def test_stop_removes_it(backend: Backend, specs: Callable[[str], ContainerSpec]) -> None:
    spec = specs("tiny")
    container = backend.start(spec)
    backend.stop(container.id, 2)
    assert backend.get(container.id) is None
    assert backend.list(spec.instance) == []
    assert backend.logs(container.id) == ""
    backend.stop(container.id, 2)  # a second stop, of a missing container, is fine
    backend.stop("0123456789ab-no-such-container", 0)


def test_missing_image_raises_and_leaves_nothing(
    backend: Backend, specs: Callable[[str], ContainerSpec]
) -> None:
    spec = specs("ghost")
    with pytest.raises(ImageMissing) as raised:
        backend.start(spec)
    assert raised.value.model == "ghost"
    assert "'ghost'" in str(raised.value)
    assert MISSING_IMAGE in str(raised.value)
    assert backend.list(spec.instance) == []
    assert backend.image_id(spec.image) is None


def test_gpu_request_without_gpu_runtime_raises_and_leaves_nothing(
    backend: Backend, specs: Callable[[str], ContainerSpec]
) -> None:
    spec = specs("gpu")
    with pytest.raises(GpuUnavailable) as raised:
        backend.start(spec)
    assert raised.value.model == "gpu"
    assert "'gpu'" in str(raised.value)
    assert backend.list(spec.instance) == []  # not even a `created` one


def test_a_command_that_exits_at_once(backend: Backend, specs: Callable[[str], ContainerSpec]) -> None:
    if isinstance(backend, FakeBackend):
        backend.behaviour["boom"] = FakeModel(exit_at_start="boom")
    spec = specs("boom")
    container = backend.start(spec)  # starting succeeds; the process dies on its own
    assert container.model == "boom"
    assert container.spec_hash == spec.spec_hash
    stopped = _wait_stopped(backend, container.id)
    assert not stopped.running
    assert stopped.state in ("exited", "dead")
    assert stopped.host_port is None  # a container that is not running publishes no port
    assert "boom" in backend.logs(container.id)
    [listed] = backend.list(spec.instance)
    assert listed.id == container.id and not listed.running and listed.host_port is None
    backend.stop(container.id, 0)
    assert backend.list(spec.instance) == []


def test_a_followed_log_comes_in_lines_an_over_long_one_cut(
    backend: Backend, specs: Callable[[str], ContainerSpec]
) -> None:
    container = backend.start(specs("chatty"))
    if isinstance(backend, FakeBackend):
        for line in ("first", "x" * 100_000, "last"):
            backend.write_log("chatty", line)
        backend.crash("chatty")
    lines = list(backend.follow(container.id))  # until the container stops
    assert lines == ["first", "x" * LONGEST_LINE + " [cut: 100000 bytes]", "last"]
    backend.stop(container.id, 0)


def test_a_leftover_with_the_same_name_is_replaced(
    backend: Backend, specs: Callable[[str], ContainerSpec]
) -> None:
    spec = specs("tiny")
    first = backend.start(spec)
    second = backend.start(spec)  # the name is taken by `first`, a leftover of this instance
    assert second.id != first.id
    assert second.running and second.name == first.name
    assert backend.get(first.id) is None
    assert [c.id for c in backend.list(spec.instance)] == [second.id]


def test_a_start_while_another_thread_removes_the_leftover(
    backend: Backend, specs: Callable[[str], ContainerSpec]
) -> None:
    """As when the swapper's crash check removes a dead container while a request starts anew."""
    spec = specs("tiny")
    for _ in range(3):
        leftover = backend.start(spec)
        _crash(backend, leftover)
        barrier = threading.Barrier(2)

        def remove(leftover: Container = leftover, barrier: threading.Barrier = barrier) -> None:
            barrier.wait(10)
            backend.stop(leftover.id, 0)

        with ThreadPoolExecutor(1) as pool:
            removing = pool.submit(remove)
            barrier.wait(10)
            started = backend.start(spec)
            removing.result(30)
        assert started.running and started.id != leftover.id
        assert backend.get(leftover.id) is None
        assert [c.id for c in backend.list(spec.instance)] == [started.id]


def test_instances_do_not_see_each_other(
    backend: Backend, instance: str, models_dir: Path, tmp_path: Path
) -> None:
    other = f"{instance}-b"
    mine = backend.start(build_spec(_config(instance, models_dir, tmp_path), "tiny"))
    theirs = backend.start(build_spec(_config(other, models_dir, tmp_path), "tiny"))
    assert mine.name != theirs.name
    assert [c.id for c in backend.list(instance)] == [mine.id]
    assert [c.id for c in backend.list(other)] == [theirs.id]
    backend.stop(theirs.id, 2)
    assert [c.id for c in backend.list(instance)] == [mine.id]
    assert backend.list(other) == []


# The pull tests' registry serves on this machine's 127.0.0.1, which another machine's engine
# cannot reach: they run on the local engines.
@pytest.fixture
def pullable(backend: Backend, request: pytest.FixtureRequest) -> str:
    """An image its registry holds and this machine lacks: on Docker the registry fixture's
    (the test image plus an 8 MB layer of its own), in the fake's registry alike."""
    if isinstance(backend, FakeBackend):
        image = "127.0.0.1:5000/swapctl/llama-server:pull-test"
        backend.registry[image] = FakeImage(layers=(8_000_000,))
        return image
    registry = request.getfixturevalue("registry")
    registry.absent()
    return str(registry.image)


@pytest.mark.parametrize("backend", LOCAL_ENGINES, indirect=True)
def test_a_pull_reports_its_layers_and_makes_the_image_present(backend: Backend, pullable: str) -> None:
    assert backend.image_id(pullable) is None
    reports: list[LayerReport] = []
    backend.pull(pullable, reports.append)
    assert backend.image_id(pullable) is not None
    downloads = [r for r in reports if r.status == "Downloading"]
    assert downloads and all(r.layer and r.total and 0 <= (r.current or 0) <= r.total for r in downloads)
    assert max(r.total or 0 for r in downloads) >= 8_000_000  # the layer it lacked
    downloaded = {r.layer for r in downloads}
    assert downloaded <= {r.layer for r in reports if r.status == "Pull complete"}


@pytest.mark.parametrize("backend", LOCAL_ENGINES, indirect=True)
def test_a_pull_of_a_tag_the_registry_lacks_fails_naming_it(backend: Backend, pullable: str) -> None:
    missing = pullable.replace(":pull-test", ":no-such-tag")
    with pytest.raises(PullFailed) as raised:
        backend.pull(missing, lambda report: None)
    assert str(raised.value).startswith(f"cannot pull image '{missing}': manifest for {missing} not found")
    assert "manifest unknown" in str(raised.value)
    assert backend.image_id(missing) is None
