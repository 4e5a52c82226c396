"""Two boxes on one machine, for tests and benchmarks of peers: this machine's `swapctl up`
(the front, "a") and a peer ("b"): another `swapctl up` in a network namespace of its own,
driving a second real dockerd there (tests/engines.py), so the front reaches it over a veth
pair as it would reach another machine. Both run real llama-server containers.

    a (this machine, its local engine)     llm, shared           one at a time
    b (the namespace, its own engine)      big, shared, talk,    one at a time
                                           slow

`talk` is a WebSocket echo server, `slow` an echo server that takes 65 s to start; a also offers b's `big` as a proxy: model (`b-big`); b names a as a peer offering `ghost`
(a loop, for the test of one). Needs root and the scripts/hosts.sh packages.

    with two_boxes(docker_engine, models_dir, folder) as boxes:
        httpx.get(f"{boxes.a.url}/v1/models")
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import httpx
import pytest
from conftest import remove_instance_containers
from engines import SecondEngine
from netns import stop_pid
from openai import OpenAI
from support import free_port, llama_model, running_models, write_yaml

IMAGE = "swapctl/llama-server:sid"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SLOW_START = 65  # seconds: past llama-swap's 60 s header timeout for peers


@dataclass
class Up:
    """A `swapctl up` process, here or in a namespace."""

    url: str
    pid: int
    log: Path
    instance: str

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        pytest.fail(f"swapctl up at {self.url} did not answer:\n{self.log.read_text()}", pytrace=False)

    def models(self) -> dict[str, str]:
        listed = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]
        return {entry["id"]: entry["status"]["value"] for entry in listed}


def argv(config: Path, listen: str) -> list[str]:
    return [sys.executable, "-m", "swapctl", "up", "-c", str(config), "--listen", listen]


def poll(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` held, checked every 50 ms."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            pytest.fail(f"not within {timeout}s: {what}", pytrace=False)
        time.sleep(0.05)
    return time.monotonic() - began


@dataclass
class Boxes:
    a: Up
    b: Up
    second: SecondEngine
    local: docker.DockerClient

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"{self.a.url}/v1", api_key="x", max_retries=0, timeout=60)

    def running_here(self) -> frozenset[str]:
        return running_models(self.local, self.a.instance)

    def running_there(self) -> frozenset[str]:
        return running_models(self.second.control, self.b.instance)


@contextlib.contextmanager
def two_boxes(local: docker.DockerClient, models_dir: Path, folder: Path) -> Iterator[Boxes]:
    """Both boxes answering, the front listing the peer's models; at the end a stopped, its
    containers removed, and the namespace closed (b, its engine and its containers with it).
    Configs and logs go to `folder`."""
    tag = uuid.uuid4().hex[:6]
    with SecondEngine.start(image=IMAGE, ssh=False) as second:
        box = second.box
        port_a, port_b = free_port(), free_port()
        url_a, url_b = f"http://{box.gateway}:{port_a}", f"http://{box.address}:{port_b}"
        instance_a, instance_b = f"a-{tag}", f"b-{tag}"
        config_b = {
            "instance": instance_b,
            "healthCheckTimeout": 60,
            "models": {
                "big": llama_model(models_dir, 3),
                "shared": llama_model(models_dir, 2),
                "talk": {  # a WebSocket echo server (standard library only)
                    "template": "llama-server",
                    "entrypoint": ["python3"],
                    "command": ["/srv/ws_echo_server.py", "--port", "8080"],
                    "volumes": [f"{SCRIPTS}:/srv:ro"],
                    "stop_grace_period": "1s",
                },
                "slow": {  # an OpenAI-shaped echo server whose start takes longer than 60 s
                    "template": "llama-server",
                    "entrypoint": ["sh", "-c"],
                    "command": [f"sleep {SLOW_START}; exec python3 /srv/echo_server.py --port 8080"],
                    "volumes": [f"{SCRIPTS}:/srv:ro"],
                    "healthCheckTimeout": 2 * SLOW_START,
                    "stop_grace_period": "1s",
                },
            },
            "peers": {"a": {"proxy": url_a, "models": ["ghost"]}},  # a loop, for the test of one
        }
        config_a = {
            "instance": instance_a,
            "healthCheckTimeout": 60,
            "models": {
                "llm": llama_model(models_dir, 1),
                "shared": llama_model(models_dir, 2),
                # b itself, as an OpenAI-compatible server elsewhere
                "b-big": {"proxy": url_b, "useModelName": "big"},
            },
            "peers": {"b": {"proxy": url_b}},  # models: auto
        }
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        pid_b = box.spawn(
            argv(write_yaml(folder / "b.yaml", config_b), f"{box.address}:{port_b}"),
            folder / "b.log",
            env={
                **env,
                "DOCKER_HOST": f"unix://{second.socket}",
                "SWAPCTL_STATE_DIR": str(folder / "b-state"),
            },
        )
        b = Up(url_b, pid_b, folder / "b.log", instance_b)
        with (folder / "a.log").open("wb") as log:
            process = subprocess.Popen(
                argv(write_yaml(folder / "a.yaml", config_a), f"{box.gateway}:{port_a}"),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        a = Up(url_a, process.pid, folder / "a.log", instance_a)
        try:
            b.wait()
            a.wait()
            poll(lambda: "big" in a.models(), 10, "the front lists the peer's models")
            yield Boxes(a, b, second, local)
        finally:
            stop_pid(process.pid)
            process.wait(10)
            remove_instance_containers(local, a.instance)
