"""Hosts in the lifecycle on real Docker: one `swapctl up` on this machine driving its local
engine and a second real dockerd in a network namespace (tests/engines.py) as host `gpu2`,
over TCP with mutual TLS, each with its own matrix; real llama-server containers on both,
the official `openai` client in front.

    local (this machine's engine)   chat            one at a time
    gpu2 (the second dockerd)       big, shared     one at a time
    shared may run on either: local first, as its `hosts` says
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from conftest import remove_instance_containers
from engines import SecondEngine
from openai import OpenAI
from registry import Registry, serve_in
from support import Proxy, llama_model, running_models, write_yaml

pytestmark = pytest.mark.docker
IMAGE = "swapctl/llama-server:sid"


@pytest.fixture(scope="module")
def second(docker_engine: docker.DockerClient) -> Iterator[SecondEngine]:
    with SecondEngine.start(image=IMAGE, ssh=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def proxy(
    second: SecondEngine,
    docker_engine: docker.DockerClient,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Proxy]:
    instance = f"fleet-{uuid.uuid4().hex[:6]}"
    folder = tmp_path_factory.mktemp("fleet")
    config = {
        "instance": instance,
        "healthCheckTimeout": 60,
        "hosts": hosts(second),
        "models": {
            "chat": llama_model(models_dir, 1),
            "big": {**llama_model(models_dir, 3), "hosts": ["gpu2"]},
            "shared": {**llama_model(models_dir, 2), "hosts": ["local", "gpu2"]},
        },
    }
    found = Proxy(write_yaml(folder / "swapctl.yaml", config), instance, folder)
    try:
        found.start()
        yield found
    finally:
        found.close()
        remove_instance_containers(docker_engine, instance)


def hosts(second: SecondEngine) -> dict[str, Any]:
    """`hosts:` naming the second engine `gpu2`, over mutual TLS."""
    made = second.certificates
    return {
        "gpu2": {
            "docker": f"tcp://{second.address}:2376",
            "tls": {"ca": str(made.ca), "cert": str(made.client_cert), "key": str(made.client_key)},
            "address": second.address,
            "timeout": 10,
        }
    }


def client(proxy: Proxy) -> OpenAI:
    return proxy.client(timeout=60)


def streamed(proxy: Proxy, model: str) -> str:
    stream = client(proxy).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text, f"{model}: an empty stream"
    return text


def test_a_model_of_the_second_engine_streams_through_this_machines_up(
    proxy: Proxy, second: SecondEngine, docker_engine: docker.DockerClient
) -> None:
    streamed(proxy, "big")
    assert running_models(second.control, proxy.instance) == {"big"}
    assert running_models(docker_engine, proxy.instance) == frozenset()
    running = httpx.get(f"{proxy.url}/running", timeout=10).json()["models"]
    big = next(row for row in running if row["model"] == "big")
    assert big["place"] == "gpu2" and big["state"] == "ready"


def test_a_model_on_both_hosts_starts_where_its_plan_costs_less(
    proxy: Proxy, second: SecondEngine, docker_engine: docker.DockerClient
) -> None:
    httpx.post(f"{proxy.url}/unload", timeout=60).raise_for_status()
    streamed(proxy, "chat")  # here, shared would stop chat: cost 1; on gpu2, nothing: 0
    streamed(proxy, "shared")
    assert running_models(second.control, proxy.instance) == {"shared"}
    assert running_models(docker_engine, proxy.instance) == {"chat"}


def test_down_without_a_proxy_removes_the_containers_on_every_host(
    proxy: Proxy, second: SecondEngine, docker_engine: docker.DockerClient
) -> None:
    streamed(proxy, "big")
    argv = [sys.executable, "-m", "swapctl", "down", "-c", str(proxy.config), "--url", "http://127.0.0.1:9"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert running_models(second.control, proxy.instance) == frozenset()
    assert running_models(docker_engine, proxy.instance) == frozenset()
    assert "big@gpu2" not in done.stderr and "removed" in done.stdout


def test_status_with_no_proxy_reads_every_hosts_engine(proxy: Proxy, second: SecondEngine) -> None:
    streamed(proxy, "big")
    argv = [sys.executable, "-m", "swapctl", "status", "--json", "-c", str(proxy.config)]
    done = subprocess.run([*argv, "--url", "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = {(row["model"], row.get("place")): row for row in json.loads(done.stdout)["models"]}
    assert rows[("big", "gpu2")]["state"] == "ready" or rows[("big", "gpu2")]["container"]
    assert rows[("chat", None)]["container"] is None


def test_logs_of_a_model_on_another_host_are_read_from_its_engine(proxy: Proxy, second: SecondEngine) -> None:
    streamed(proxy, "big")
    argv = [sys.executable, "-m", "swapctl", "logs", "big", "--tail", "1000", "-c", str(proxy.config)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (container,) = [c for c in second.control.containers.list() if c.labels.get("swapctl.model") == "big"]
    assert done.stdout.strip() and done.stdout.strip().splitlines()[0] in container.logs().decode()
    assert "listening" in done.stdout  # llama-server's own line


def test_a_model_of_another_host_is_pulled_there_by_swapctl_pull_and_by_its_start(
    second: SecondEngine,
    docker_engine: docker.DockerClient,
    registry: Registry,
    models_dir: Path,
    instance: str,
    tmp_path: Path,
) -> None:
    with serve_in(second.box, registry, second.control) as there:  # gpu2's own 127.0.0.1
        config = {
            "instance": instance,
            "healthCheckTimeout": 60,
            "hosts": hosts(second),
            "models": {"fresh": {**llama_model(models_dir, 3), "image": there.image, "hosts": ["gpu2"]}},
        }
        path = write_yaml(tmp_path / "swapctl.yaml", config)
        argv = [sys.executable, "-m", "swapctl", "pull", "fresh", "-c", str(path)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "host gpu2" in done.stdout and f"pulled image {there.image}" in done.stdout
        assert there.present()  # on gpu2's engine, and not here
        with pytest.raises(docker.errors.ImageNotFound):
            docker_engine.images.get(there.image)
        there.absent()
        proxy = Proxy(path, instance, tmp_path)
        try:
            proxy.start()
            streamed(proxy, "fresh")  # its start pulls it there first
            assert there.present() and running_models(second.control, instance) == {"fresh"}
        finally:
            proxy.close()
            remove_instance_containers(second.control, instance)


def wait_for_line(proxy: Proxy, line: str, after: int, timeout: float = 30) -> float:
    """Seconds until `line` is in the proxy's log past its first `after` characters."""
    began = time.monotonic()
    while line not in proxy.log()[after:]:
        assert time.monotonic() - began < timeout, proxy.log()
        time.sleep(0.1)
    return time.monotonic() - began


def test_a_host_cut_off_answers_503_and_is_taken_back(proxy: Proxy, second: SecondEngine) -> None:
    streamed(proxy, "chat")
    mark = len(proxy.log())
    second.box.link_down()
    try:
        noticed = wait_for_line(proxy, "host 'gpu2': its Docker engine does not answer", mark)
        answer = httpx.post(
            f"{proxy.url}/v1/chat/completions", json={"model": "big", "messages": []}, timeout=30
        )
        assert answer.status_code == 503 and "host 'gpu2'" in answer.json()["error"]["message"]
        streamed(proxy, "chat")  # this machine's engine serves on
    finally:
        second.box.link_up()
    back = wait_for_line(proxy, "host 'gpu2': its Docker engine answers again", mark)
    streamed(proxy, "big")
    print(f"\nlink cut: noticed after {noticed:.1f}s, taken back {back:.1f}s after the link came back")


def test_a_killed_engine_is_noticed_its_models_answer_503_and_this_machine_serves_on(
    proxy: Proxy, second: SecondEngine, docker_engine: docker.DockerClient
) -> None:
    streamed(proxy, "big")
    mark = len(proxy.log())
    os.kill(second.pid, signal.SIGKILL)  # its containers run on, unmanaged
    noticed = wait_for_line(proxy, "host 'gpu2': its Docker engine does not answer", mark)
    answer = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "big", "messages": []}, timeout=30)
    assert answer.status_code == 503, answer.text
    assert "host 'gpu2'" in answer.json()["error"]["message"]
    streamed(proxy, "chat")  # this machine's engine serves on
    streamed(proxy, "shared")  # its other host: here
    assert running_models(docker_engine, proxy.instance) <= {"chat", "shared"}
    print(f"\nthe killed engine was noticed after {noticed:.1f}s")
