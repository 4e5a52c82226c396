"""Every request on record through a real `swapctl up` and a real llama-server: the tokens
and speed of a real chat (from its `usage` and llama.cpp's `timings`), its capture without
the client's key, and a long stream cancelled while the container serves on (Docker is the
witness that it is the same container)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from conftest import remove_instance_containers
from openai import OpenAI
from support import MESSAGES, Proxy, Streamed, containers, long_model, stream_chat, write_yaml

pytestmark = pytest.mark.docker

KEY = "sk-not-for-the-record"


@pytest.fixture(scope="module")
def proxy(
    docker_engine: docker.DockerClient, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    instance = f"t-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("record")
    config = {
        "instance": instance,
        "healthCheckTimeout": 30,
        "captureBuffer": 4,
        "models": {"llm": long_model(models_dir, 1)},
    }
    proxy = Proxy(write_yaml(workdir / "swapctl.yaml", config), instance, workdir)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()
        remove_instance_containers(docker_engine, instance)


def record(proxy: Proxy) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(f"{proxy.url}/requests", timeout=10).json()["requests"]
    return found


def test_a_real_chat_on_record_with_its_tokens_and_speed(proxy: Proxy) -> None:
    client = OpenAI(base_url=f"{proxy.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="llm", messages=MESSAGES, max_tokens=16, temperature=0)
    assert answer.usage is not None
    whole = record(proxy)[0]
    assert (whole["model"], whole["status"], whole["route"], whole["place"]) == (
        "llm",
        200,
        "/v1/chat/completions",
        "local",
    )
    assert whole["completion_tokens"] == answer.usage.completion_tokens
    assert whole["prompt_tokens"] == answer.usage.prompt_tokens
    assert whole["tokens_per_s"] > 0 and whole["prompt_tokens_per_s"] > 0  # llama.cpp's timings
    captured = httpx.get(f"{proxy.url}/requests/{whole['id']}", timeout=10).json()
    assert json.loads(captured["capture"]["response"]["body"])["usage"]["completion_tokens"] > 0
    assert KEY not in json.dumps(captured) and "authorization" not in json.dumps(captured).lower()

    streamed = client.chat.completions.create(
        model="llm",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in streamed if chunk.usage is not None]
    found = record(proxy)[0]
    assert found["completion_tokens"] == usage[0].completion_tokens and found["tokens_per_s"] > 0
    assert found["first_byte_seconds"] is not None and found["first_byte_seconds"] <= found["seconds"]


def test_a_long_real_stream_cancelled_while_its_container_serves_on(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    client = OpenAI(base_url=f"{proxy.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    client.chat.completions.create(model="llm", messages=MESSAGES, max_tokens=1)
    before = containers(docker_engine, proxy.instance)
    result: list[Streamed] = []
    reader = threading.Thread(target=lambda: result.append(stream_chat(proxy.url, "llm", 8000, timeout=300)))
    reader.start()
    deadline = time.monotonic() + 60
    flying: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not flying:
        flying = [r for r in record(proxy) if r["in_flight"] and r["first_byte_seconds"] is not None]
        time.sleep(0.05)
    assert flying, proxy.log()
    cancelled = httpx.post(f"{proxy.url}/requests/{flying[0]['id']}/cancel", timeout=10)
    assert cancelled.status_code == 202
    reader.join(60)
    assert not reader.is_alive()
    stream = result[0]
    assert stream.error is not None and stream.error["code"] == "request_cancelled", stream
    assert "model 'llm'" in stream.error["message"] and not stream.done
    ended = next(r for r in record(proxy) if r["id"] == flying[0]["id"])
    assert (ended["status"], ended["cancelled"]) == (499, True)
    # the same container serves the next request
    again = client.chat.completions.create(model="llm", messages=MESSAGES, max_tokens=4)
    assert again.choices[0].message is not None
    assert containers(docker_engine, proxy.instance) == before
