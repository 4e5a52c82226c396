"""The sleep tier on real Docker through a real `swapctl up`: a model with `sleep: 1`, evicted
to make room, is put to sleep (its container runs on, its server says it sleeps), and its next
request wakes that same container. Its server is scripts/sleep_server.py, which serves vLLM's
sleep routes and answers 503 to a chat while asleep, so a forward to a sleeping server shows."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from support import Proxy, containers, poll, write_yaml

pytestmark = pytest.mark.docker

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def sleep_model(*flags: str, **keys: Any) -> dict[str, Any]:
    """A model whose container runs scripts/sleep_server.py in the test image, sleep mode on."""
    return {
        "template": "llama-server",
        "entrypoint": ["python3"],
        "command": ["/srv/sleep_server.py", "--port", "8080", "--enable-sleep-mode", *flags],
        "environment": {"VLLM_SERVER_DEV_MODE": "1"},
        "volumes": [f"{SCRIPTS}:/srv:ro"],
        "stop_grace_period": "1s",
        **keys,
    }


def config(instance: str) -> dict[str, Any]:
    return {
        "instance": instance,
        "healthCheckTimeout": 30,
        "models": {
            "a": sleep_model("--sleep-delay", "0.2", "--wake-delay", "0.3", sleep=1),
            "b": sleep_model(),
        },
        "matrix": {"sets": {"a": "a", "b": "b"}},
    }


def server_url(engine: docker.DockerClient, container_id: str) -> str:
    """The model server's own address, as Docker publishes it: on 127.0.0.1 only."""
    found = engine.containers.get(container_id)
    bindings = [b for ports in found.ports.values() for b in ports or []]
    assert bindings and all(b["HostIp"] == "127.0.0.1" for b in bindings), bindings
    return f"http://127.0.0.1:{bindings[0]['HostPort']}"


def is_sleeping(url: str) -> bool:
    answer = httpx.get(f"{url}/is_sleeping", timeout=10).json()["is_sleeping"]
    assert isinstance(answer, bool)
    return answer


def say(proxy: Proxy, model: str) -> str:
    answer = proxy.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    text = answer.choices[0].message.content
    assert text is not None
    return text


def started(instance: str, tmp_path: Path, proxies: list[Proxy]) -> Proxy:
    """A `swapctl up` of config(instance), started; stopped after the test."""
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config(instance)), instance, tmp_path)
    proxies.append(proxy)
    proxy.start()
    return proxy


def test_an_evicted_model_sleeps_and_wakes_in_the_same_container(
    instance: str, tmp_path: Path, docker_engine: docker.DockerClient, proxies: list[Proxy]
) -> None:
    proxy = started(instance, tmp_path, proxies)

    assert say(proxy, "a") == "a answers, awake (woken 0 times)"
    first = containers(docker_engine, instance)["a"]
    url = server_url(docker_engine, first)
    assert not is_sleeping(url)

    assert say(proxy, "b").startswith("b answers")
    running = containers(docker_engine, instance)
    assert running == {"a": first, "b": running["b"]}, "a's container runs on, asleep"
    assert is_sleeping(url)
    assert proxy.running()["a"]["state"] == "sleeping"
    assert "sleep: a asleep at level 1" in proxy.log()

    assert say(proxy, "a") == "a answers, awake (woken 1 times)", "served by the woken server"
    kept = Path(os.environ["SWAPCTL_STATE_DIR"], "measures", f"{instance}.json")

    def measured() -> dict[str, Any]:
        return json.loads(kept.read_text()) if kept.exists() else {}

    def both_kept() -> bool:
        models = measured().get("models", {})
        return (
            len(models.get("a", {}).get("wakes", [])) == 1 and len(models.get("b", {}).get("starts", [])) == 1
        )

    poll(both_kept, 10, "the start and the wake kept in the state file")
    assert len(measured()["models"]["a"]["starts"]) == 1  # its one cold start; the wake is apart
    assert containers(docker_engine, instance) == {"a": first}, "the same container; b evicted"
    assert not is_sleeping(url)
    poll(lambda: "wake: a awake in " in proxy.log(), 10, "the wake's log line")
    assert (
        'swapctl_model_wake_duration_seconds_count{model="a"} 1.0' in httpx.get(f"{proxy.url}/metrics").text
    )

    say(proxy, "b")  # asleep again; then unload removes it for real
    assert is_sleeping(url)
    proxy.swapctl("unload", "a")
    assert set(containers(docker_engine, instance, running_only=False)) == {"b"}


def test_up_adopts_a_sleeping_container_as_sleeping(
    instance: str, tmp_path: Path, docker_engine: docker.DockerClient, proxies: list[Proxy]
) -> None:
    proxy = started(instance, tmp_path, proxies)
    say(proxy, "a")
    say(proxy, "b")
    before = containers(docker_engine, instance)
    proxy.stop()  # the containers keep running, for the next `up` to adopt
    seen = proxy.swapctl_json("status")  # from Docker: a's server is asked whether it sleeps
    assert seen["source"] == "docker"
    assert {row["model"]: row["state"] for row in seen["models"]} == {"a": "sleeping", "b": "running"}

    proxy.start()
    assert "adopted a (" in proxy.log() and "), asleep" in proxy.log()
    assert proxy.running()["a"]["state"] == "sleeping"
    assert proxy.running()["b"]["state"] == "ready"
    assert say(proxy, "a") == "a answers, awake (woken 1 times)"
    assert containers(docker_engine, instance) == {"a": before["a"]}
