"""End to end: the real `swapctl up` in a subprocess, real containers of llama-server with
tiny GGUF models, and the official `openai` client. Docker is the witness: after each
request, the containers that run are read from the engine, never from swapctl."""

from __future__ import annotations

import concurrent.futures
import http.client
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import openai
import pytest
import yaml
from openai import OpenAI
from support import MESSAGES, Proxy, chat, containers, poll

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
SEEDS = {"chat": 1, "code": 2, "big": 3}


def _llama(seed: int) -> list[str]:
    return ["--host", "0.0.0.0", "--port", "8080", "-m", f"/models/seed-{seed}.gguf", "-c", "512"]


def write_config(path: Path, instance: str, models_dir: Path) -> None:
    llama = {
        "template": "llama-server",
        "volumes": [f"{models_dir}:/models:ro"],
        "environment": {"LLAMA_ARG_THREADS": "1"},
        "stop_grace_period": "2s",
    }
    config = {
        "instance": instance,
        "healthCheckTimeout": 30,
        "models": {
            **{model: {**llama, "command": _llama(seed)} for model, seed in SEEDS.items()},
            "broken": {
                "template": "llama-server",
                "entrypoint": ["sh", "-c"],
                "command": ["echo boom >&2; exit 3"],
            },
        },
        "matrix": {
            "vars": {"c": "chat", "k": "code", "B": "big", "x": "broken"},
            "sets": {"pair": "c & k", "alone": "B", "broken": "x"},
            "evict_costs": {"B": 10},
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture
def proxy(instance: str, models_dir: Path, tmp_path: Path) -> Iterator[Proxy]:
    config = tmp_path / "swapctl.yaml"
    write_config(config, instance, models_dir)
    proxy = Proxy(config, instance, tmp_path)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()  # before `instance` removes the containers


def chat_streamed(client: OpenAI, model: str) -> str:
    parts: list[str] = []
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=8, stream=True
    )
    with stream:
        for chunk in stream:
            parts.extend(choice.delta.content for choice in chunk.choices if choice.delta.content)
    return "".join(parts)


def test_swaps_follow_the_matrix(proxy: Proxy, docker_engine: docker.DockerClient) -> None:
    client = proxy.client()
    texts: dict[str, str] = {}
    steps = [("chat", {"chat"}), ("code", {"chat", "code"}), ("big", {"big"}), ("chat", {"chat"})]
    for model, allowed in steps:
        plain = chat(client, model)
        assert set(containers(docker_engine, proxy.instance)) == allowed, f"after the request for {model}"
        streamed = chat_streamed(client, model)
        assert set(containers(docker_engine, proxy.instance)) == allowed, f"after the stream of {model}"
        assert streamed == plain, f"{model}: streamed and plain answers differ"
        assert texts.setdefault(model, plain) == plain, f"{model} answers differently after a restart"

        if model == "code":  # chat and code run: ask the CLI, compare with Docker
            running = containers(docker_engine, proxy.instance)
            status = proxy.swapctl_json("status")
            assert status["source"] == "proxy"
            ready = {m["model"]: m for m in status["models"] if m["state"] == "ready"}
            assert set(ready) == set(running)
            assert {m["state"] for m in status["models"] if m["model"] not in ready} == {"stopped"}
            names = {c.name for c in docker_engine.containers.list(filters={"id": list(running.values())})}
            assert {m["container"] for m in ready.values()} == names
            plan = proxy.swapctl_json("plan", "B")
            assert plan["model"] == "big" and not plan["already_running"]
            assert sorted(plan["evict"]) == ["chat", "code"]
    assert len(set(texts.values())) == 3, f"models with different seeds answer alike: {texts}"

    plan = proxy.swapctl_json("plan", "B")
    assert plan["evict"] == ["chat"] == list(containers(docker_engine, proxy.instance))
    assert proxy.swapctl_json("plan", "c")["already_running"] is True


def test_concurrent_requests_for_a_cold_model_start_it_once(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    clients = [proxy.client() for _ in range(8)]
    barrier = threading.Barrier(len(clients))

    def ask(client: OpenAI) -> str:
        barrier.wait(10)
        return chat(client, "code")

    with concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
        answers = list(pool.map(ask, clients))
    assert len(answers) == 8 and all(answers)
    log = proxy.log()
    assert log.count("starting code (") == 1, log
    assert set(containers(docker_engine, proxy.instance, running_only=False)) == {"code"}


def test_a_killed_container_is_replaced(proxy: Proxy, docker_engine: docker.DockerClient) -> None:
    client = proxy.client()
    first = chat(client, "chat")
    killed = containers(docker_engine, proxy.instance)["chat"]
    docker_engine.containers.get(killed).kill()

    poll(lambda: proxy.running()["chat"]["state"] == "stopped", 10, "the proxy to notice the crash")
    assert chat(client, "chat") == first
    now = containers(docker_engine, proxy.instance)
    assert set(now) == {"chat"} and now["chat"] != killed

    def removed() -> bool:
        try:
            docker_engine.containers.get(killed)
        except docker.errors.NotFound:
            return True
        return False

    poll(removed, 10, "the killed container to be removed")
    assert "stopped unexpectedly" in proxy.log()


def test_a_restarted_proxy_adopts_the_running_containers(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    chat(proxy.client(), "chat")
    chat(proxy.client(), "code")
    before = containers(docker_engine, proxy.instance)
    assert set(before) == {"chat", "code"}

    code = proxy.stop(signal.SIGINT)  # --keep-running is the default: the containers stay
    assert code in (0, 130), f"swapctl up did not exit by itself on SIGINT (status {code}):\n{proxy.log()}"
    assert containers(docker_engine, proxy.instance) == before
    proxy.start()
    log = proxy.log()
    assert "adopted chat (" in log and "adopted code (" in log, log
    running = proxy.running()
    assert {m for m, s in running.items() if s["state"] == "ready"} == {"chat", "code"}

    client = proxy.client()
    for model in ("chat", "code"):
        began = time.monotonic()
        chat(client, model)
        assert time.monotonic() - began < 2, f"{model} was not answered at once"
    assert containers(docker_engine, proxy.instance) == before
    assert "starting " not in proxy.log()


def test_down_removes_every_container(proxy: Proxy, docker_engine: docker.DockerClient) -> None:
    chat(proxy.client(), "chat")
    chat(proxy.client(), "code")
    assert set(containers(docker_engine, proxy.instance)) == {"chat", "code"}
    proxy.swapctl("down")
    assert containers(docker_engine, proxy.instance, running_only=False) == {}
    assert {s["state"] for s in proxy.running().values()} == {"stopped"}


def test_an_unknown_model_is_not_found(proxy: Proxy, docker_engine: docker.DockerClient) -> None:
    client = proxy.client()
    chat(client, "chat")
    before = containers(docker_engine, proxy.instance, running_only=False)
    with pytest.raises(openai.NotFoundError) as raised:
        chat(client, "no-such-model")
    assert "no-such-model" in raised.value.message
    assert containers(docker_engine, proxy.instance, running_only=False) == before


def test_a_failed_start_is_reported_and_leaves_nothing(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    client = proxy.client()
    chat(client, "chat")
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as raised:
        chat(client, "broken")
    assert time.monotonic() - began < 5
    assert raised.value.status_code == 502
    message = raised.value.message
    assert "'broken'" in message and "boom" in message, message
    # `broken` runs alone, so `chat` was stopped first; of `broken`, nothing is left
    assert containers(docker_engine, proxy.instance, running_only=False) == {}
    assert chat(client, "code")
    assert set(containers(docker_engine, proxy.instance, running_only=False)) == {"code"}


def test_an_idle_client_connection_stays_open_past_the_clients_own_expiry(proxy: Proxy) -> None:
    """HTTP clients drop an idle connection after a few seconds (httpx, so the OpenAI SDKs:
    5 s). The proxy keeps its end open longer, so a client never sends on a connection the
    proxy is closing at that very moment (it would get no answer at all)."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        for _ in range(2):  # one connection: a closed one makes the second request fail
            connection.request("GET", "/health")
            answer = connection.getresponse()
            assert (answer.status, answer.read()) == (200, b"OK")
            time.sleep(6)  # past the 5 s after which uvicorn would close it by default
    finally:
        connection.close()
