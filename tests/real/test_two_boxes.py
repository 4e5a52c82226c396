"""Two boxes: this machine's `swapctl up` (the front, "a") and a peer ("b"): another
`swapctl up` in a network namespace of its own, driving a second real dockerd there
(tests/engines.py), so the front reaches it over a veth pair as it would reach another
machine. Both run real llama-server containers; the official `openai` client talks to the
front only.

    a (this machine, its local engine)     llm, shared      one at a time
    b (the namespace, its own engine)      big, shared      one at a time

Faults: the peer stopped (`kill -STOP`: connections accepted, nothing answered), its link
down, its packets dropped; and a loop between the two.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from conftest import remove_instance_containers
from engines import SecondEngine
from netns import stop_pid
from openai import OpenAI
from support import free_port, llama_model, running_models, write_yaml
from websockets.sync.client import connect

pytestmark = pytest.mark.docker
IMAGE = "swapctl/llama-server:sid"
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


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


def streamed(client: OpenAI, model: str) -> str:
    """A streamed chat through the official client: its text (it raises on an error event)."""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text, f"{model}: an empty stream"
    return text


def argv(config: Path, listen: str) -> list[str]:
    return [sys.executable, "-m", "swapctl", "up", "-c", str(config), "--listen", listen]


def poll(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition` held."""
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


@pytest.fixture(scope="module")
def boxes(
    docker_engine: docker.DockerClient, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Boxes]:
    folder = tmp_path_factory.mktemp("peers")
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
            yield Boxes(a, b, second, docker_engine)
        finally:
            stop_pid(process.pid)
            process.wait(10)
            remove_instance_containers(docker_engine, a.instance)


def test_a_stream_through_two_hops_and_the_front_knows_what_is_loaded(boxes: Boxes) -> None:
    assert boxes.a.models()["big"] == "unloaded"
    streamed(boxes.client(), "big")
    assert boxes.running_there() == {"big"} and boxes.running_here() == frozenset()
    poll(lambda: boxes.a.models()["big"] == "loaded", 10, "the front shows big loaded")
    plain = boxes.client().chat.completions.create(
        model="big", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert plain.choices[0].message.content is not None


def test_a_proxy_model_streams(boxes: Boxes) -> None:
    streamed(boxes.client(), "b-big")
    assert boxes.running_there() == {"big"}  # b served it (useModelName named its model)


def test_a_model_on_both_boxes_starts_where_its_plan_costs_less(boxes: Boxes) -> None:
    client = boxes.client()
    httpx.post(f"{boxes.b.url}/unload", timeout=30).raise_for_status()
    client.chat.completions.create(model="llm", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert boxes.running_here() == {"llm"}  # here, 'shared' would stop llm: cost 1; there: 0
    poll(lambda: boxes.a.models()["big"] == "unloaded", 10, "the front sees b idle")
    client.chat.completions.create(model="shared", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert boxes.running_there() == {"shared"} and boxes.running_here() == {"llm"}
    # loaded there, it is served there even when here would cost nothing now
    httpx.post(f"{boxes.a.url}/unload", timeout=30).raise_for_status()
    client.chat.completions.create(model="shared", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert boxes.running_here() == frozenset()


def test_a_websocket_through_two_hops(boxes: Boxes) -> None:
    url = boxes.a.url.replace("http://", "ws://", 1) + "/upstream/talk/chat"
    with connect(url, proxy=None, open_timeout=60) as socket:
        socket.send("hello")
        assert socket.recv(timeout=30) == "hello"
        socket.send(b"\x00\x01")
        assert socket.recv(timeout=30) == b"\x00\x01"
    assert boxes.running_there() == {"talk"}


def test_a_loop_between_peers_is_refused(boxes: Boxes) -> None:
    poll(lambda: "ghost" in boxes.a.models(), 10, "a learns of ghost from b's list")
    answer = httpx.post(
        f"{boxes.a.url}/v1/chat/completions", json={"model": "ghost", "messages": []}, timeout=30
    )
    assert answer.status_code == 508, answer.text
    assert answer.json()["error"]["code"] == "loop_detected"


@pytest.mark.parametrize("fault", ["stop", "link down", "drop"])
def test_a_peer_that_goes_away_is_noticed_skipped_and_taken_back(boxes: Boxes, fault: str) -> None:
    client = boxes.client()
    streamed(client, "big")
    box = boxes.second.box
    began = time.monotonic()
    undo: Callable[[], Any]
    if fault == "stop":
        os.kill(boxes.b.pid, signal.SIGSTOP)
        undo = lambda: os.kill(boxes.b.pid, signal.SIGCONT)  # noqa: E731
    elif fault == "link down":
        box.link_down()
        undo = box.link_up
    else:
        box.drop()
        undo = box.undrop
    try:
        noticed = poll(lambda: boxes.a.models().get("big") == "unloaded", 15, "the front notices b is gone")
        answer = httpx.post(
            f"{boxes.a.url}/v1/chat/completions", json={"model": "big", "messages": []}, timeout=5
        )
        assert answer.status_code == 502
        assert "peer 'b'" in answer.json()["error"]["message"]
        assert boxes.running_here() <= {"llm", "shared"} and len(boxes.running_here()) <= 1
    finally:
        undo()
    back = time.monotonic()
    recovered = poll(lambda: boxes.a.models().get("big") == "loaded", 30, "the front takes b back")
    streamed(client, "big")
    print(f"\n{fault}: noticed after {noticed:.1f}s, taken back {recovered:.1f}s after it answered again")
    assert began < back
    assert len(boxes.running_there()) <= 1
