"""The Compose keys of a model server, on the real engine: a llama-server container started
through the Docker backend with many of them, inspected (HostConfig, networks), and
reached through its port published on 127.0.0.1 although it lives on networks of its own."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest

from swapctl.backend.docker import DockerBackend
from swapctl.config import parse_config
from swapctl.errors import GpuUnavailable
from swapctl.spec import build_spec

pytestmark = pytest.mark.docker

IMAGE = "swapctl/llama-server:sid"


@pytest.fixture
def networks(docker_engine: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """Two user-defined bridge networks, removed afterwards."""
    names = (f"swapctl-test-{uuid.uuid4().hex[:8]}", f"swapctl-test-{uuid.uuid4().hex[:8]}")
    created = [docker_engine.networks.create(name, driver="bridge") for name in names]
    yield names
    for network in created:
        network.remove()


def wait_healthy(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url}/health never answered 200"
        time.sleep(0.05)


def test_a_model_with_many_compose_keys_runs_as_written(
    docker_engine: docker.DockerClient,
    instance: str,
    models_dir: Path,
    tmp_path: Path,
    networks: tuple[str, str],
) -> None:
    front, back = networks
    model = {
        "image": IMAGE,
        "entrypoint": ["llama-server"],
        "command": ["--host", "0.0.0.0", "--port", "8080", "-m", "/models/seed-1.gguf", "-c", "512"],
        "volumes": [f"{models_dir}:/models:ro"],
        "environment": {"LLAMA_ARG_THREADS": "1"},
        "stop_grace_period": "2s",
        # within this machine's own limits (memlock 8 MiB, nofile 20000): raising them needs privileges
        "ulimits": {"nofile": {"soft": 4096, "hard": 8192}, "memlock": 4096},
        "runtime": "runc",
        "group_add": ["44"],
        "security_opt": ["no-new-privileges"],
        "cap_add": ["SYS_NICE"],
        "cap_drop": ["NET_RAW"],
        "tmpfs": ["/scratch:size=16m"],
        "deploy": {"resources": {"limits": {"cpus": "0.5", "memory": "256m"}}},
        "extra_hosts": {"registry.local": "10.1.2.3"},
        "networks": {front: {"aliases": ["chat-model"]}, back: None},
    }
    config = parse_config({"instance": instance, "models": {"m": model}}, base_dir=tmp_path, environ={})
    backend = DockerBackend()
    container = backend.start(build_spec(config, "m"))
    try:
        wait_healthy(container.url)  # reached on 127.0.0.1 though it lives on networks of its own
        attrs = docker_engine.api.inspect_container(container.id)
        host = attrs["HostConfig"]
        assert sorted((u["Name"], u["Soft"], u["Hard"]) for u in host["Ulimits"]) == [
            ("memlock", 4096, 4096),
            ("nofile", 4096, 8192),
        ]
        assert host["Runtime"] == "runc"
        assert host["GroupAdd"] == ["44"]
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert (host["CapAdd"], host["CapDrop"]) == (["SYS_NICE"], ["NET_RAW"])
        assert host["Tmpfs"] == {"/scratch": "size=16m"}
        assert (host["NanoCpus"], host["Memory"]) == (500_000_000, 256 * 2**20)
        assert host["ExtraHosts"] == ["registry.local:10.1.2.3"]
        assert host["NetworkMode"] == front
        assert host["PortBindings"]["8080/tcp"][0]["HostIp"] == "127.0.0.1"
        joined = attrs["NetworkSettings"]["Networks"]
        assert set(joined) == {front, back}
        assert "chat-model" in joined[front]["Aliases"]
    finally:
        backend.stop(container.id, 2)
    assert backend.get(container.id) is None


def test_a_missing_network_is_a_clear_error_and_leaves_nothing(
    docker_engine: docker.DockerClient, instance: str, tmp_path: Path
) -> None:
    config = parse_config(
        {
            "instance": instance,
            "models": {"m": {"image": IMAGE, "networks": ["swapctl-test-no-such-network"]}},
        },
        base_dir=tmp_path,
        environ={},
    )
    with pytest.raises(Exception, match="create it \\(docker network create NAME\\)"):
        DockerBackend().start(build_spec(config, "m"))
    assert DockerBackend().list(instance) == []


def test_compose_gpu_form_without_a_gpu_runtime_is_a_clear_error(
    docker_engine: docker.DockerClient, instance: str, tmp_path: Path
) -> None:
    """This machine has no GPU runtime: the device request is made, and refused as `gpus:` is."""
    devices = [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    model = {"image": IMAGE, "deploy": {"resources": {"reservations": {"devices": devices}}}}
    config = parse_config({"instance": instance, "models": {"m": model}}, base_dir=tmp_path, environ={})
    with pytest.raises(GpuUnavailable, match=re.escape("deploy.resources.reservations.devices")):
        DockerBackend().start(build_spec(config, "m"))
    assert DockerBackend().list(instance) == []
