"""Another machine's Docker engine, and what goes wrong with it: a second real dockerd in a
network namespace of its own (tests/engines.py), reached over TCP with mutual TLS. An engine
that dies, a cable pulled, packets dropped: calls fail within the engine's timeout, naming
the engine and why, and `ping` says so; a client without a certificate is refused, saying so."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
from engines import SecondEngine

from swapctl.backend.docker import DockerBackend
from swapctl.config import parse_config
from swapctl.errors import DaemonUnavailable
from swapctl.spec import build_spec

pytestmark = pytest.mark.docker

IMAGE = "swapctl/llama-server:sid"
TIMEOUT = 3.0  # the engine's timeout in these tests: a call waits no longer for an answer


@pytest.fixture
def lone(docker_engine: docker.DockerClient) -> Iterator[SecondEngine]:
    """An engine of a test's own, to break (no image, no sshd)."""
    with SecondEngine.start(ssh=False) as engine:
        yield engine


def _fails_naming_the_engine(backend: DockerBackend, *why: str) -> str:
    began = time.monotonic()
    with pytest.raises(DaemonUnavailable) as raised:
        backend.list("t-any")
    waited = time.monotonic() - began
    message = str(raised.value)
    assert message.startswith(f"cannot reach the Docker engine of {backend.engine.where}: ")
    assert backend.engine.docker is not None and backend.engine.docker in message
    if why:
        assert any(reason in message for reason in why), message
    assert waited < 10 * TIMEOUT, f"the call took {waited:.0f}s"  # bounded, not hung
    return message


def test_a_killed_engine_is_noticed_and_named(lone: SecondEngine) -> None:
    backend = DockerBackend(lone.tls_engine(timeout=TIMEOUT))
    assert backend.ping() and backend.list("t-any") == []
    lone.kill()  # SIGKILL, by its PID
    assert not backend.ping()
    # a new connection is refused; one the pool still held is reset (which comes first is a race)
    _fails_naming_the_engine(backend, "connection refused", "connection reset")


def test_a_cut_link_fails_calls_in_bounded_time_and_heals(lone: SecondEngine) -> None:
    backend = DockerBackend(lone.tls_engine(timeout=TIMEOUT))
    assert backend.ping()
    lone.box.link_down()
    try:
        assert not backend.ping()
        _fails_naming_the_engine(backend)
    finally:
        lone.box.link_up()
    deadline = time.monotonic() + 30
    while not backend.ping():  # the neighbour is found again
        assert time.monotonic() < deadline, "the engine did not answer again once the link was up"
    assert backend.list("t-any") == []


@pytest.mark.parametrize("connected", [False, True], ids=["before-connecting", "once-connected"])
def test_an_ssh_engine_behind_dropped_packets_is_a_timeout_not_a_hang(
    docker_engine: docker.DockerClient, connected: bool
) -> None:
    """Before the first call, the ssh connection itself must not hang; once connected, each
    call opens an ssh session (or reuses a pooled one), which must not hang either."""
    with SecondEngine.start(ssh=True) as engine, engine.ssh_user():
        backend = DockerBackend(engine.ssh_engine(timeout=TIMEOUT))
        assert not connected or backend.ping()
        engine.box.drop()
        try:
            began = time.monotonic()
            assert not backend.ping()
            assert time.monotonic() - began < 10 * TIMEOUT, "ping hung"
            _fails_naming_the_engine(backend, f"no answer within {TIMEOUT:g}s")  # a session of its own
        finally:
            engine.box.undrop()
        assert backend.ping() and backend.list("t-any") == []
        backend.close()


def test_dropped_packets_are_a_timeout_not_a_hang(lone: SecondEngine) -> None:
    backend = DockerBackend(lone.tls_engine(timeout=TIMEOUT))
    lone.box.drop()
    try:
        assert not backend.ping()
        _fails_naming_the_engine(backend, f"no answer within {TIMEOUT:g}s")
    finally:
        lone.box.undrop()
    assert backend.ping()


def test_tls_without_a_client_certificate_is_refused_saying_so(lone: SecondEngine) -> None:
    backend = DockerBackend(lone.tls_engine(timeout=TIMEOUT, client=False))
    assert not backend.ping()
    _fails_naming_the_engine(backend, "TLS failed: the engine wants a client certificate")
    assert DockerBackend(lone.tls_engine(timeout=TIMEOUT)).ping()  # with one it answers


@pytest.mark.timeout(120)
def test_a_container_there_is_reached_on_its_address(
    docker_engine: docker.DockerClient, instance: str, models_dir: Path, tmp_path: Path
) -> None:
    """A llama-server started on the other engine answers from this machine at its url."""
    config = parse_config(
        {
            "instance": instance,
            "models": {
                "tiny": {
                    "image": IMAGE,
                    "entrypoint": ["llama-server"],
                    "command": [
                        "--host",
                        "0.0.0.0",
                        "--port",
                        "8080",
                        "-m",
                        "/models/seed-1.gguf",
                        "-c",
                        "512",
                    ],
                    "volumes": [f"{models_dir}:/models:ro"],
                }
            },
        },
        base_dir=tmp_path,
    )
    with SecondEngine.start(image=IMAGE, ssh=False) as second:
        backend = DockerBackend(second.tls_engine())
        container = backend.start(build_spec(config, "tiny"))
        assert container.url == f"http://{second.address}:{container.host_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{container.url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, backend.logs(container.id)
            time.sleep(0.1)
        backend.stop(container.id, 2)
        assert backend.list(instance) == []
