"""Loading feedback on real Docker through a real `swapctl up` and the official `openai`
client: a cold streamed request gets its first byte at once, notes while its model starts
(SSE comments, or `reasoning_content` with sendLoadingState), then the answer; a start that
fails ends the stream with an error the client raises."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import MESSAGES, Proxy, chat, llama_model, write_yaml

pytestmark = pytest.mark.docker

# a start ~2 s slower ("$$" is Compose's literal "$")
SLOW_START = ["sh", "-c", 'sleep 2 && exec llama-server "$$@"', "llama-server"]
MISSING = "fatal: cannot open /models/missing.gguf"


@pytest.fixture
def proxy(instance: str, models_dir: Path, tmp_path: Path) -> Iterator[Proxy]:
    config: dict[str, Any] = {
        "instance": instance,
        "healthCheckTimeout": 30,
        "models": {  # one at a time: each start evicts the model that runs
            "chat": llama_model(models_dir, 1),
            "slow": {**llama_model(models_dir, 2), "entrypoint": SLOW_START},
            "told": {**llama_model(models_dir, 3), "entrypoint": SLOW_START, "sendLoadingState": True},
            "broken": {
                "template": "llama-server",
                "entrypoint": ["sh", "-c"],
                "command": [f"echo '{MISSING}' >&2; exit 3"],
            },
        },
    }
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()


def first_byte(url: str, body: dict[str, Any]) -> tuple[float, float, bytes]:
    """Seconds to the response's first body byte and to its first `data:` event; the body."""
    first = data = 0.0
    received = b""
    with httpx.Client(timeout=60) as http:  # made before the clock starts (its SSL context)
        began = time.monotonic()
        with http.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            for piece in response.iter_raw():
                first = first or time.monotonic() - began
                received += piece
                if not data and b"data: " in received:
                    data = time.monotonic() - began
    return first, data, received


def start_took(proxy: Proxy, model: str) -> float:
    """How long the model's last start took, as the proxy measured it (its log line)."""
    found = re.findall(rf"swap: {model} ready in ([0-9.]+)s", proxy.log())
    assert found, proxy.log()
    return float(found[-1])


def stream(client: openai.OpenAI, model: str) -> tuple[str, str]:
    """A streamed chat completion through the openai client: its reasoning and its answer."""
    reasoning: list[str] = []
    content: list[str] = []
    with client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=8, stream=True
    ) as chunks:
        for chunk in chunks:
            for choice in chunk.choices:
                extra = choice.delta.model_extra or {}
                reasoning.append(extra.get("reasoning_content") or "")
                content.append(choice.delta.content or "")
    return "".join(reasoning), "".join(content)


def test_a_cold_stream_has_its_first_byte_before_its_model_is_ready(proxy: Proxy) -> None:
    client = proxy.client()
    body = {"model": "slow", "messages": MESSAGES, "max_tokens": 8, "stream": True, "temperature": 0}

    chat(client, "chat")  # before: the passthrough route waits for the start, as every route did
    before, _, _ = first_byte(f"{proxy.url}/upstream/slow/v1/chat/completions", body)
    before_start = start_took(proxy, "slow")

    chat(client, "chat")  # evicts slow: cold again
    after, data, received = first_byte(f"{proxy.url}/v1/chat/completions", body)
    after_start = start_took(proxy, "slow")
    print(
        f"\ncold streamed request, first byte: before {before:.3f}s (start {before_start:.3f}s), "
        f"after {after:.3f}s (start {after_start:.3f}s, first answer event at {data:.3f}s)"
    )
    assert before >= before_start >= 2
    assert after < 0.2 < 2 <= after_start <= data
    lines = received.decode().split("\n")
    comments = [line for line in lines if line.startswith(":")]
    assert comments[0].startswith(": loading slow ") and len(comments) >= 2
    assert lines[-3:] == ["data: [DONE]", "", ""]

    ready, _, _ = first_byte(f"{proxy.url}/v1/chat/completions", body)  # the floor: no start
    print(f"the same request for the ready model: first byte after {ready:.3f}s")

    plain = chat(client, "slow")
    chat(client, "chat")
    _, streamed = stream(client, "slow")  # the comments are ignored by the client
    assert streamed == plain


def test_send_loading_state_shows_the_wait_as_reasoning_content(proxy: Proxy) -> None:
    client = proxy.client()
    chat(client, "chat")
    reasoning, content = stream(client, "told")
    print(f"\nreasoning_content of a cold start:\n{reasoning}")
    assert reasoning.startswith("Loading told: no start of it measured yet")
    assert "Stopping chat to make room" in reasoning
    assert "Starting its container" in reasoning
    assert "told is ready after" in reasoning
    assert content == chat(client, "told")

    chat(client, "chat")
    reasoning, content = stream(client, "told")
    print(f"reasoning_content of the next start:\n{reasoning}")
    assert re.search(r"about \d+s \(last starts \d+\.\ds\)", reasoning)
    assert content


def test_a_failed_start_makes_the_openai_client_raise_with_the_containers_log(proxy: Proxy) -> None:
    client = proxy.client()
    with pytest.raises(openai.APIError) as raised:
        stream(client, "broken")
    assert not isinstance(raised.value, openai.APIStatusError)  # the head was a 200
    message = raised.value.message
    assert "model 'broken' failed to start" in message and MISSING in message, message
    assert isinstance(raised.value.body, dict) and raised.value.body["code"] == "model_start_failed"
    assert all(m["in_flight"] == 0 for m in proxy.running().values())
