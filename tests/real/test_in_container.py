"""swapctl in a container of its own image (the Dockerfile, built offline from the locally
built Debian image and wheels downloaded on the host), driving the host's engine through its
socket, and reaching its models on the config's `network`: no model publishes a port. Docker
is the witness of what runs, where, and what is published."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from conftest import LLAMA_IMAGE, remove_instance_containers
from openai import OpenAI
from support import chat, config_document, containers, llama_model, poll, write_yaml

from swapctl.backend.docker import DockerBackend
from swapctl.config import load_config
from swapctl.spec import INSTANCE, MANAGED, build_spec

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
REPOSITORY = "swapctl/swapctl"
SOCKET = "/var/run/docker.sock"
# what the image is made of: a change to any of them builds it again, else the last one serves
SOURCES = ("Dockerfile", "pyproject.toml", "setup.py", "README.md", "scripts/image-wheels.sh")
TREES = (("swapctl", "*.py"), ("swapctl", "*.html"), ("compose-templates", "*.yaml"))


def _content_hash() -> str:
    files = [ROOT / name for name in SOURCES]
    files += sorted(path for folder, pattern in TREES for path in (ROOT / folder).rglob(pattern))
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _run(argv: list[str], timeout: float) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(argv)}: exit {done.returncode}\n{done.stdout}{done.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def image(docker_engine: docker.DockerClient) -> str:
    """swapctl's image, FROM the Debian image (no registry reachable in a build), built once
    per content of its sources; older test builds are removed."""
    tag = f"{REPOSITORY}:test-{_content_hash()}"
    try:
        docker_engine.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass
    python = docker_engine.containers.run(
        LLAMA_IMAGE, ["-c", "import sys; print('%d.%d' % sys.version_info[:2])"], entrypoint="python3",
        remove=True, network_mode="none",
    ).decode().strip()  # fmt: skip
    context = ROOT / "build" / "swapctl-image"
    _run(["bash", "scripts/image-wheels.sh", str(context / "wheels"), python], timeout=600)
    _run(["docker", "build", "-q", "-t", tag, "--build-arg", f"BASE={LLAMA_IMAGE}", "-f", "Dockerfile",
          str(context)], timeout=600)  # fmt: skip
    for old in docker_engine.images.list(REPOSITORY):
        if tag not in old.tags:
            docker_engine.images.remove(old.id, force=True)
    return tag


@pytest.fixture
def network(docker_engine: docker.DockerClient, instance: str) -> Iterator[str]:
    """A network name of this test's; removed afterwards, with every container of the instance."""
    name = f"{instance}-net"
    yield name
    remove_instance_containers(docker_engine, instance)
    for found in docker_engine.networks.list(names=[name]):
        found.remove()


def _published(attrs: dict[str, Any]) -> list[Any]:
    bound = [*(attrs["HostConfig"].get("PortBindings") or {}).values()]
    return [b for b in [*bound, *(attrs["NetworkSettings"].get("Ports") or {}).values()] if b]


def test_from_the_host_a_missing_network_is_made_and_the_model_reached_on_it(
    docker_engine: docker.DockerClient, instance: str, network: str, models_dir: Path, tmp_path: Path
) -> None:
    models = {"tiny": llama_model(models_dir, 1)}
    document = config_document(instance, models, {"sets": {"one": "tiny"}}, network=network)
    spec = build_spec(load_config(write_yaml(tmp_path / "swapctl.yaml", document)), "tiny")
    backend = DockerBackend()
    started = backend.start(spec)
    made = docker_engine.networks.get(network)
    assert (made.attrs["Driver"], made.attrs["Labels"]) == ("bridge", {MANAGED: "true"})
    attrs = docker_engine.api.inspect_container(started.id)
    assert _published(attrs) == []
    assert started.url == f"http://{attrs['NetworkSettings']['Networks'][network]['IPAddress']}:8080"
    poll(lambda: _answers(started.url), 60, "llama-server to answer at its address on the network")
    assert [found.url for found in backend.list(instance)] == [started.url]  # the summary says so too
    backend.stop(started.id, 2)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _serve(
    engine: docker.DockerClient, image: str, config: Path, network: str, instance: str, *args: str
) -> Any:
    """`swapctl up` in its image, the host's engine through the socket, on `network`, its
    8080 published on 127.0.0.1 (the only port this test publishes); labelled as the
    instance's so that cleanup finds it."""
    swapctl = engine.containers.run(
        image,
        list(args),
        detach=True,
        labels={INSTANCE: f"{instance}-up"},
        volumes={SOCKET: {"bind": SOCKET, "mode": "rw"}, str(config): {"bind": "/etc/swapctl/swapctl.yaml", "mode": "ro"}},
        network=network,
        ports={"8080/tcp": ("127.0.0.1", None)},
    )  # fmt: skip
    swapctl.reload()
    url = f"http://127.0.0.1:{swapctl.ports['8080/tcp'][0]['HostPort']}"
    poll(lambda: _answers(url) or _exited(swapctl), 60, "swapctl up in its container to answer /health")
    assert not _exited(swapctl), swapctl.logs().decode(errors="replace")
    return swapctl, url


def _exited(container: Any) -> bool:
    container.reload()
    return bool(container.status == "exited")


def test_swapctl_in_its_container_serves_a_chat_from_a_model_on_the_network(
    docker_engine: docker.DockerClient, image: str, instance: str, network: str, models_dir: Path, tmp_path: Path
) -> None:  # fmt: skip
    docker_engine.networks.create(network, driver="bridge", labels={MANAGED: "true"})  # as Compose would
    models = {"tiny": llama_model(models_dir, 1)}
    config = write_yaml(tmp_path / "swapctl.yaml", config_document(instance, models, {"sets": {"one": "tiny"}}, network=network))  # fmt: skip

    swapctl, url = _serve(docker_engine, image, config, network, instance)
    with OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        assert chat(client, "tiny")
    [model] = containers(docker_engine, instance).values()
    attrs = docker_engine.api.inspect_container(model)
    assert _published(attrs) == [], "the model publishes no port"
    assert set(attrs["NetworkSettings"]["Networks"]) == {network}

    swapctl.stop(timeout=30)  # SIGTERM, without --stop-on-exit: the model stays, for the next up
    assert containers(docker_engine, instance) == {"tiny": model}
    swapctl.remove()

    swapctl, url = _serve(docker_engine, image, config, network, instance, "--stop-on-exit")
    with OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        assert chat(client, "tiny")
    assert containers(docker_engine, instance) == {"tiny": model}, "adopted, reached on the network"
    swapctl.stop(timeout=30)
    assert containers(docker_engine, instance, running_only=False) == {}, "stopped and removed with it"
