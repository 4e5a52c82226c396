"""Every proxy route through a real `swapctl up` and real containers, with the official
`openai` client (plain HTTP where it has no method).

llama-server (with `--embeddings --pooling mean`) answers chat, embeddings and the Responses
API; the routes it lacks (audio, images, rerank, anything else) go to containers of the same
image running `scripts/echo_server.py`, which reports the model name it received and the size
and SHA-256 of each upload. Docker is the witness of which containers run after each request.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import docker
import httpx
import openai
import pytest
from conftest import remove_instance_containers
from openai import OpenAI
from support import Proxy, containers, llama_model, write_yaml

pytestmark = pytest.mark.docker

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load_echo_server() -> ModuleType:
    spec = importlib.util.spec_from_file_location("swapctl_echo_server", SCRIPTS / "echo_server.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


echo_server = _load_echo_server()

# model -> the models the matrix lets run beside it (itself included)
TOGETHER = {
    "llm": {"llm", "echo-text"},
    "echo-text": {"llm", "echo-text"},
    "tts": {"tts", "stt"},
    "stt": {"tts", "stt"},
    "imager": {"imager"},
}


Running = Callable[[str], set[str]]


def echo_model(**keys: Any) -> dict[str, Any]:
    """A model whose container runs scripts/echo_server.py in the llama-server image."""
    return {
        "template": "llama-server",
        "entrypoint": ["python3"],
        "command": ["/srv/echo_server.py", "--port", "8080"],
        "volumes": [f"{SCRIPTS}:/srv:ro"],
        "stop_grace_period": "1s",
        **keys,
    }


def routes_config(instance: str, models_dir: Path) -> dict[str, Any]:
    return {
        "instance": instance,
        "healthCheckTimeout": 30,
        "models": {
            "llm": {
                **llama_model(models_dir, 1, "--embeddings", "--pooling", "mean"),
                "aliases": ["text-embedding-3-small"],
            },
            "echo-text": echo_model(aliases=["text-echo", "rerank-english"], useModelName="upstream-text"),
            "tts": echo_model(aliases=["tts-1"], useModelName="upstream-tts"),
            "stt": echo_model(aliases=["whisper-1"], useModelName="upstream-stt"),
            "imager": echo_model(aliases=["dall-e-3"]),  # no useModelName: the name goes as sent
        },
        "matrix": {
            "vars": {"L": "llm", "t": "echo-text", "v": "tts", "s": "stt", "i": "imager"},
            "sets": {"text": "L & t", "audio": "v & s", "images": "i"},
        },
    }


@pytest.fixture(scope="module")
def proxy(
    docker_engine: docker.DockerClient, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """One `swapctl up` for the whole module (starting it per test would cost seconds)."""
    instance = f"t-{uuid.uuid4().hex[:8]}"
    workdir = tmp_path_factory.mktemp("routes")
    config = write_yaml(workdir / "swapctl.yaml", routes_config(instance, models_dir))
    proxy = Proxy(config, instance, workdir)
    try:
        proxy.start()
        yield proxy
    finally:
        proxy.close()
        remove_instance_containers(docker_engine, instance)


@pytest.fixture(scope="module")
def client(proxy: Proxy) -> OpenAI:
    return proxy.client()


@pytest.fixture
def running(proxy: Proxy, docker_engine: docker.DockerClient) -> Running:
    """running(model): assert, from Docker, that `model` runs beside only what the matrix allows."""

    def check(model: str) -> set[str]:
        now = set(containers(docker_engine, proxy.instance))
        assert model in now, f"{model} does not run: {now}\n{proxy.log()}"
        assert now <= TOGETHER[model], f"{now} run together, against the matrix"
        return now

    return check


def upload(size: int, seed: int) -> bytes:
    """`size` random bytes, with what a careless multipart parser would trip on inside."""
    data = bytearray(hashlib.shake_256(str(seed).encode()).digest(size))
    trap = b'\r\n--boundary\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
    for offset in (0, size // 3, size - len(trap)):
        data[offset : offset + len(trap)] = trap
    return bytes(data)


def echo(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- embeddings ----------------------------------------------------------------------------


def test_embeddings_from_llama_server_and_from_the_echo(client: OpenAI, running: Running) -> None:
    texts = ["hello", "a longer sentence"]
    answer = client.embeddings.create(model="text-embedding-3-small", input=texts)  # base64 by default
    assert [d.index for d in answer.data] == [0, 1]
    assert {len(d.embedding) for d in answer.data} == {64}  # the tiny model's width
    floats = client.embeddings.create(model="llm", input=texts, encoding_format="float")
    for packed, plain in zip(answer.data, floats.data, strict=True):
        assert packed.embedding == pytest.approx(plain.embedding, abs=1e-6)
    assert answer.data[0].embedding != answer.data[1].embedding
    running("llm")

    echoed = client.embeddings.create(model="text-echo", input=texts)
    assert echoed.model == "upstream-text"  # useModelName reached upstream in the JSON body
    for item, text in zip(echoed.data, texts, strict=True):
        assert item.embedding == pytest.approx(echo_server.embedding(text), abs=1e-6)
    assert running("echo-text") == {"llm", "echo-text"}


# -- responses -----------------------------------------------------------------------------


def test_responses_from_llama_server_plain_and_streamed(client: OpenAI, running: Running) -> None:
    answer = client.responses.create(model="llm", input="Tell me a story.", max_output_tokens=8)
    assert answer.status == "completed" and answer.output_text
    deltas: list[str] = []
    final = None
    with client.responses.create(
        model="llm", input="Tell me a story.", max_output_tokens=8, stream=True
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            elif event.type == "response.completed":
                final = event.response
    assert final is not None and final.output_text == "".join(deltas) != ""
    running("llm")


def test_responses_from_the_echo_plain_and_streamed(client: OpenAI, running: Running) -> None:
    answer = client.responses.create(model="text-echo", input="hello there")
    assert answer.model == "upstream-text"
    assert answer.output_text == "upstream-text heard: hello there"
    with client.responses.create(model="text-echo", input="hello there", stream=True) as stream:
        events = list(stream)
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert " ".join(deltas) == "upstream-text heard: hello there"
    running("echo-text")


# -- audio ---------------------------------------------------------------------------------


def test_speech_streams_the_audio_through(client: OpenAI, running: Running) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input="Hello, world."
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        assert "content-length" not in response.headers  # streamed on, not gathered first
        chunks = list(response.iter_bytes())
    audio = b"".join(chunks)
    assert audio == echo_server.speech_bytes("upstream-tts", "Hello, world.")
    running("tts")


def test_a_5_mb_transcription_upload_goes_through_untouched(client: OpenAI, running: Running) -> None:
    data = upload(5 * 2**20, seed=5)
    answer = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", data, "audio/wav"))
    # upstream saw the rewritten model name in the form, and exactly the bytes sent
    assert answer.text == f"upstream-stt {len(data)} {hashlib.sha256(data).hexdigest()}"
    assert running("stt") <= {"tts", "stt"}

    text = client.audio.transcriptions.create(
        model="stt", file=("speech.wav", data[:1000]), response_format="text"
    )
    assert text == f"upstream-stt 1000 {hashlib.sha256(data[:1000]).hexdigest()}"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client marks the method so
def test_translation(client: OpenAI, running: Running) -> None:
    data = upload(300_000, seed=6)
    answer = client.audio.translations.create(model="whisper-1", file=("speech.mp3", data))
    assert answer.text == f"upstream-stt {len(data)} {hashlib.sha256(data).hexdigest()}"
    running("stt")


def test_a_form_with_the_file_before_the_model_is_rewritten_in_the_right_place(
    proxy: Proxy, running: Running
) -> None:
    """The model field after a file whose name and content look like a model field."""
    data = upload(200_000, seed=7)
    files: dict[str, tuple[str | None, bytes, str | None]] = {
        "file": ("model", data, "application/octet-stream"),
        "model": (None, b"whisper-1", None),
    }
    response = httpx.post(f"{proxy.url}/v1/audio/transcriptions", files=files, timeout=30)
    assert echo(response)["text"] == f"upstream-stt {len(data)} {hashlib.sha256(data).hexdigest()}"
    running("stt")


# -- images --------------------------------------------------------------------------------


def test_image_generation(client: OpenAI, running: Running) -> None:
    answer = client.images.generate(model="dall-e-3", prompt="a red fox", n=2)
    assert answer.data is not None and len(answer.data) == 2
    assert answer.data[0].b64_json == echo_server.base64.b64encode(echo_server.PNG_1X1).decode()
    assert answer.data[0].revised_prompt == "dall-e-3: a red fox"  # no useModelName: as sent
    assert running("imager") == {"imager"}


def test_image_edit_uploads_the_image_untouched(client: OpenAI, running: Running) -> None:
    image = upload(1_500_000, seed=8)
    answer = client.images.edit(model="imager", prompt="add a hat", image=("fox.png", image, "image/png"))
    assert answer.data is not None
    assert answer.data[0].revised_prompt == f"imager {len(image)} {hashlib.sha256(image).hexdigest()}"
    running("imager")


# -- rerank --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank", "/v1/reranking"])
def test_rerank(proxy: Proxy, running: Running, path: str) -> None:
    documents = ["a fish", "the cat chased the dog", "a cat"]
    body = {"model": "rerank-english", "query": "cat dog", "documents": documents, "top_n": 2}
    answer = echo(httpx.post(proxy.url + path, json=body, timeout=30))
    assert answer["model"] == "upstream-text"
    assert [(r["index"], r["relevance_score"]) for r in answer["results"]] == [(1, 1.0), (2, 0.5)]
    running("echo-text")


# -- passthrough ---------------------------------------------------------------------------


def test_upstream_passthrough_with_put_and_a_body(proxy: Proxy, running: Running) -> None:
    body = upload(100_000, seed=9)
    with httpx.Client(timeout=30) as http:
        sized = echo(
            http.put(
                f"{proxy.url}/upstream/tts-1/some/path?x=1&y=2",
                content=body,
                headers={"content-type": "application/x-test"},
            )
        )

        def pieces() -> Iterator[bytes]:  # no content-length: chunked all the way
            yield body[:40_000]
            yield body[40_000:]

        chunked = echo(http.put(f"{proxy.url}/upstream/tts/some/path", content=pieces()))
        bare = echo(http.delete(f"{proxy.url}/upstream/tts"))
    digest = hashlib.sha256(body).hexdigest()
    assert sized == {
        "method": "PUT",
        "path": "/some/path",
        "query": "x=1&y=2",
        "bytes": len(body),
        "sha256": digest,
        "content_type": "application/x-test",
        "json": None,  # not a JSON body
    }
    assert (chunked["path"], chunked["bytes"], chunked["sha256"]) == ("/some/path", len(body), digest)
    assert (bare["method"], bare["path"], bare["bytes"]) == ("DELETE", "/", 0)
    running("tts")


def test_any_route_with_the_model_in_the_query(proxy: Proxy, running: Running) -> None:
    answer = echo(httpx.get(f"{proxy.url}/anything/at/all?model=dall-e-3&x=1", timeout=30))
    assert answer | {"content_type": None} == {
        "method": "GET",
        "path": "/anything/at/all",
        "query": "model=dall-e-3&x=1",
        "bytes": 0,
        "sha256": hashlib.sha256(b"").hexdigest(),
        "content_type": None,  # (aiohttp adds application/octet-stream upstream: not checked)
        "json": None,
    }
    running("imager")
    posted = echo(httpx.post(f"{proxy.url}/v1/other?model=stt", content=b'{"a": 1}', timeout=30))
    assert (posted["method"], posted["path"], posted["bytes"]) == ("POST", "/v1/other", 8)
    running("stt")


def test_a_compressed_small_answer_reaches_the_client_intact(proxy: Proxy, running: Running) -> None:
    """An upstream may compress what it answers: the proxy must not decode it and keep the header."""
    body = json.dumps({"payload": "x" * 5000}).encode()
    response = httpx.post(
        f"{proxy.url}/echo/gzip?model=imager&gzip=1",
        content=body,
        headers={"accept-encoding": "gzip"},
        timeout=30,
    )
    assert echo(response)["bytes"] == len(body)
    running("imager")


# -- swaps across routes -------------------------------------------------------------------


def test_swaps_follow_the_matrix_across_routes(
    proxy: Proxy, client: OpenAI, docker_engine: docker.DockerClient
) -> None:
    assert httpx.post(f"{proxy.url}/unload", timeout=30).status_code == 200
    assert containers(docker_engine, proxy.instance) == {}
    log_before = len(proxy.log())

    def rerank() -> None:
        body = {"model": "rerank-english", "query": "q", "documents": ["q"]}
        echo(httpx.post(f"{proxy.url}/rerank", json=body, timeout=30))

    def transcribe() -> None:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF...."))

    def speak() -> None:
        with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input="x") as r:
            r.read()

    steps: list[tuple[str, Callable[[], object], set[str]]] = [
        ("rerank", rerank, {"echo-text"}),
        ("embeddings", lambda: client.embeddings.create(model="llm", input="x"), {"echo-text", "llm"}),
        ("speech", speak, {"tts"}),
        ("transcription", transcribe, {"tts", "stt"}),
        ("images", lambda: client.images.generate(model="dall-e-3", prompt="x"), {"imager"}),
        ("upstream", lambda: echo(httpx.get(f"{proxy.url}/upstream/stt/x", timeout=30)), {"stt"}),
        ("query", lambda: echo(httpx.get(f"{proxy.url}/x?model=text-echo", timeout=30)), {"echo-text"}),
        (
            "responses",
            lambda: client.responses.create(model="llm", input="x", max_output_tokens=2),
            {"llm", "echo-text"},
        ),
    ]
    for route, call, expected in steps:
        call()
        assert set(containers(docker_engine, proxy.instance)) == expected, f"after the {route} request"
    # each step found its model stopped and started it, once
    starts = [line for line in proxy.log()[log_before:].splitlines() if "starting " in line]
    assert len(starts) == len(steps), starts


def test_an_unknown_model_on_each_kind_of_route_is_not_found(proxy: Proxy, client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="nope", file=("a.wav", b"x"))
    assert httpx.get(f"{proxy.url}/upstream/nope/x", timeout=30).status_code == 404
    assert httpx.get(f"{proxy.url}/x?model=nope", timeout=30).status_code == 404
