"""The clients people point at a model switcher, through a real `swapctl up`, real
containers and no `?model=`: Anthropic's SDK on the Messages API, llama.cpp's own routes
answered as the container itself answers them, and request filters as the model's server
received them.

llama-server (the test image's build) serves `/v1/messages`, `/v1/messages/count_tokens`,
`/infill`, `/tokenize`, `/detokenize` and `/apply-template` itself; the filters are seen by
`scripts/echo_server.py`, which reports the JSON body it received.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import docker
import httpx
import pytest
from anthropic.types import MessageParam
from conftest import remove_instance_containers
from support import Proxy, llama_model, running_models, write_yaml

pytestmark = pytest.mark.docker

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
HELLO: list[MessageParam] = [{"role": "user", "content": "Tell me a story."}]


def clients_config(instance: str, models_dir: Path) -> dict[str, Any]:
    echo = {
        "template": "llama-server",
        "entrypoint": ["python3"],
        "command": ["/srv/echo_server.py", "--port", "8080"],
        "volumes": [f"{SCRIPTS}:/srv:ro"],
        "stop_grace_period": "1s",
        "filters": {
            "stripParams": "top_p, metadata.user_id",
            "setParams": {"top_k": 40, "temperature?": 0.6},
            "setParamsByID": {
                "echo:think": {"chat_template_kwargs.enable_thinking": True},
                "echo:cold": {"temperature": 0.1},
            },
        },
    }
    return {
        "instance": instance,
        "healthCheckTimeout": 30,
        "models": {
            "llm": {**llama_model(models_dir, 1), "aliases": ["claude-haiku"]},
            "other": llama_model(models_dir, 2),
            "echo": echo,
        },
        "matrix": {"vars": {"L": "llm", "o": "other", "e": "echo"}, "sets": {"a": "L & e", "b": "o & e"}},
    }


@pytest.fixture(scope="module")
def proxy(
    docker_engine: docker.DockerClient, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    instance = f"t-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("clients")
    proxy = Proxy(
        write_yaml(workdir / "swapctl.yaml", clients_config(instance, models_dir)), instance, workdir
    )
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()
        remove_instance_containers(docker_engine, instance)


@pytest.fixture(scope="module")
def claude(proxy: Proxy) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=proxy.url, api_key="x", max_retries=0, timeout=60) as client:
        yield client


def direct(proxy: Proxy, model: str) -> str:
    """The model's container, called directly: its published port."""
    port = proxy.running()[model]["host_port"]
    assert port, f"{model} has no container: {proxy.running()[model]}"
    return f"http://127.0.0.1:{port}"


def test_the_anthropic_sdk_creates_streams_and_counts(
    proxy: Proxy, claude: anthropic.Anthropic, docker_engine: docker.DockerClient
) -> None:
    httpx.post(f"{proxy.url}/unload", timeout=30).raise_for_status()
    # a cold stream: swapctl's loading notes are SSE comments, which the SDK skips
    with claude.messages.stream(model="claude-haiku", max_tokens=8, messages=HELLO) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed and final.content[0].type == "text" and final.content[0].text == streamed
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert running_models(docker_engine, proxy.instance) == {"llm"}

    made = claude.messages.create(model="llm", max_tokens=8, messages=HELLO, extra_body={"temperature": 0})
    assert made.type == "message" and made.role == "assistant"
    assert made.content[0].type == "text" and made.content[0].text
    again = claude.messages.create(model="llm", max_tokens=8, messages=HELLO, extra_body={"temperature": 0})
    assert again.content == made.content  # the same server, deterministic at temperature 0

    counted = claude.messages.count_tokens(model="llm", messages=HELLO)
    body = {"model": "llm", "messages": HELLO}
    itself = httpx.post(f"{direct(proxy, 'llm')}/v1/messages/count_tokens", json=body, timeout=30).json()
    assert counted.input_tokens == itself["input_tokens"] > 0


def test_anthropic_errors_raise_the_sdks_own_exceptions(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError, match="unknown model 'claude-opus'") as caught:
        claude.messages.create(model="claude-opus", max_tokens=8, messages=HELLO)
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "unknown model 'claude-opus'"},
    }


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"content": "Hello world, a story.", "with_pieces": True}),
        ("/detokenize", {"tokens": [5, 10, 20, 40]}),
        ("/apply-template", {"messages": HELLO}),
        ("/infill", {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 4}),  # no FIM tokens: 501
        ("/completion", {"prompt": "Once", "n_predict": 4, "temperature": 0, "seed": 1}),
    ],
)
def test_llama_cpp_routes_answer_as_the_container_does(proxy: Proxy, path: str, body: dict[str, Any]) -> None:
    through = httpx.post(f"{proxy.url}{path}", json={"model": "llm", **body}, timeout=60)
    itself = httpx.post(f"{direct(proxy, 'llm')}{path}", json={"model": "llm", **body}, timeout=60)
    assert through.status_code == itself.status_code, through.text
    answer, expected = through.json(), itself.json()
    if path == "/completion":  # the same text; its timings differ from call to call
        assert answer["content"] == expected["content"] and answer["tokens_predicted"] == 4
    else:
        assert answer == expected
    # and GET /props, /slots with ?model=
    props = httpx.get(f"{proxy.url}/props", params={"model": "llm"}, timeout=30)
    assert props.status_code == 200 and "default_generation_settings" in props.json()


def test_filters_reach_the_server_as_configured(proxy: Proxy, docker_engine: docker.DockerClient) -> None:
    def received(**body: Any) -> dict[str, Any]:
        answer = httpx.post(f"{proxy.url}/v1/chat/completions", json={"messages": HELLO, **body}, timeout=60)
        assert answer.status_code == 200, answer.text
        seen: dict[str, Any] = answer.json()["json"]
        return seen

    seen = received(model="echo", top_p=0.2, top_k=1, metadata={"user_id": "u", "keep": 1})
    assert seen == {
        "model": "echo",
        "messages": HELLO,
        "top_k": 40,
        "temperature": 0.6,
        "metadata": {"keep": 1},
    }
    assert received(model="echo", temperature=1.1)["temperature"] == 1.1  # a soft default yields
    assert received(model="echo:think")["chat_template_kwargs"] == {"enable_thinking": True}
    assert received(model="echo:cold", temperature=1.1)["temperature"] == 0.1  # by ID, forced
    assert "echo" in running_models(docker_engine, proxy.instance)
