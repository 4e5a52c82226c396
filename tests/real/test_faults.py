"""Faults, against the real `swapctl up` and real llama-server containers: containers killed
while ready or while streaming, containers that never become healthy or exit at start,
clients that go away mid-stream, a request that must wait for another model's stream, bad
input, and (last, since it restarts the engine under everything) the Docker daemon
restarted under a running proxy. Docker is the witness wherever it can be."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import openai
import pytest
from support import (
    MESSAGES,
    Proxy,
    Streamed,
    chat,
    config_document,
    containers,
    llama_model,
    long_model,
    poll,
    running_models,
    stream_chat,
    write_yaml,
)

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[2]
# With one thread, the tiny model needs tens of seconds for this many tokens (about 38 s
# on a 2-core machine); nothing here ever waits for such a stream to end.
LONG_TOKENS = 16000
# A stream that a test does wait for: a few seconds (about 3.5 s on a 2-core machine).
WAIT_TOKENS = 5000

ProxyFactory = Callable[..., Proxy]


def fault_config(instance: str, models_dir: Path, **top: Any) -> dict[str, Any]:
    never = {**llama_model(models_dir, 2), "health": "/never-200", "healthCheckTimeout": 2}
    broken = {
        "template": "llama-server",
        "entrypoint": ["sh", "-c"],
        "command": ["echo boom >&2; exit 3"],
        "healthCheckTimeout": 60,
    }
    models = {
        "chat": llama_model(models_dir, 1),
        "big": llama_model(models_dir, 3),
        "long": long_model(models_dir, 2),
        "never": never,  # in no set: runs alone
        "broken": broken,  # in no set: runs alone
    }
    matrix = {
        "vars": {"c": "chat", "B": "big", "L": "long"},
        "sets": {"small": "c & L", "alone": "B"},
        "evict_costs": {"B": 10},
    }
    return config_document(instance, models, matrix, **top)


@pytest.fixture
def start_proxy(instance: str, models_dir: Path, tmp_path: Path) -> Iterator[ProxyFactory]:
    """Start `swapctl up` on a fault config (top-level keys may be added); stopped afterwards."""
    started: list[Proxy] = []

    def start(**top: Any) -> Proxy:
        config = write_yaml(tmp_path / "swapctl.yaml", fault_config(instance, models_dir, **top))
        proxy = Proxy(config, instance, tmp_path)
        started.append(proxy)
        proxy.start()
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            proxy.close()  # before `instance` removes the containers


@pytest.fixture
def proxy(start_proxy: ProxyFactory) -> Proxy:
    return start_proxy()


def slots(proxy: Proxy, model: str) -> list[dict[str, Any]]:
    """llama-server's own /slots, straight from the container's published port: asking
    through the proxy would itself count as a request in flight."""
    port = proxy.running()[model]["host_port"]
    assert port, f"{model} has no published port"
    response = httpx.get(f"http://127.0.0.1:{port}/slots", timeout=10)
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()
    return found


def processing(proxy: Proxy, model: str) -> bool:
    return any(slot["is_processing"] for slot in slots(proxy, model))


def gone(engine: docker.DockerClient, container_id: str) -> bool:
    try:
        engine.containers.get(container_id)
    except docker.errors.NotFound:
        return True
    return False


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    return error


# --- 1. containers killed -----------------------------------------------------------------


def test_a_container_killed_while_ready_is_started_again_by_the_next_request(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    client = proxy.client()
    first = chat(client, "chat")
    killed = containers(docker_engine, proxy.instance)["chat"]
    docker_engine.containers.get(killed).kill()

    # at once: the request itself finds the container dead (or the 1 s check did); started anew
    assert chat(client, "chat") == first
    now = containers(docker_engine, proxy.instance)
    assert set(now) == {"chat"} and now["chat"] != killed
    poll(lambda: gone(docker_engine, killed), 10, "the killed container to be removed")
    assert proxy.running()["chat"]["state"] == "ready"


def test_a_container_killed_while_streaming_ends_the_stream_with_an_error(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    client = proxy.client()
    chat(client, "long")
    killed = containers(docker_engine, proxy.instance)["long"]
    received: list[Any] = []
    stream = client.chat.completions.create(
        model="long", messages=MESSAGES, max_tokens=LONG_TOKENS, stream=True
    )

    def consume() -> None:
        with stream:
            for chunk in stream:
                received.append(chunk)
                if len(received) == 20:
                    docker_engine.containers.get(killed).kill()

    # Forwarded._chunks: when upstream breaks off an event stream, swapctl ends it with an
    # error event (no [DONE]); the openai client raises APIError on it.
    with pytest.raises(openai.APIError) as raised:
        consume()
    error = raised.value
    assert type(error) is openai.APIError, f"not the error event but {type(error).__name__}: {error}"
    assert "'long'" in error.message and "broke off" in error.message, error.message
    assert isinstance(error.body, dict) and error.body.get("code") == "upstream_broke_off", error.body
    assert len(received) >= 20
    assert all(c.choices[0].finish_reason is None for c in received if c.choices), "the stream was complete"

    # the break-off confirmed the death: the model is stopped, its container removed
    poll(lambda: proxy.running()["long"]["state"] == "stopped", 10, "the proxy to mark long stopped")
    poll(lambda: gone(docker_engine, killed), 10, "the killed container to be removed")
    assert proxy.running()["long"]["in_flight"] == 0
    assert chat(client, "long")
    now = containers(docker_engine, proxy.instance)
    assert "long" in now and now["long"] != killed


# --- 2, 3. containers that never become ready ----------------------------------------------


def test_a_container_that_never_becomes_healthy_fails_after_its_timeout_and_leaves_nothing(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    chat(proxy.client(), "chat")  # `never` runs alone: chat is stopped first
    began = time.monotonic()
    response = httpx.post(
        f"{proxy.url}/v1/chat/completions",
        json={"model": "never", "messages": MESSAGES, "max_tokens": 8},
        timeout=60,
    )
    elapsed = time.monotonic() - began
    error = assert_openai_error(response, 502, "model_start_failed")
    message = error["message"]
    assert "'never'" in message and "healthCheckTimeout (2s)" in message and "/never-200" in message, message
    assert 2 <= elapsed < 30, f"failed after {elapsed:.1f}s, not after its 2 s healthCheckTimeout"
    # nothing of it: not running, not exited, not `created`; the answer came after the removal
    assert containers(docker_engine, proxy.instance, running_only=False) == {}
    assert proxy.running()["never"]["state"] == "stopped"
    assert "failed to start" in proxy.log()


def test_a_container_that_exits_at_start_fails_at_once_quoting_its_logs(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as raised:
        chat(proxy.client(), "broken")
    elapsed = time.monotonic() - began
    assert raised.value.status_code == 502
    message = raised.value.message
    assert "'broken'" in message and "boom" in message and "exited" in message, message
    assert elapsed < 10, f"{elapsed:.1f}s: the exit was not seen at once (healthCheckTimeout is 60 s)"
    assert containers(docker_engine, proxy.instance, running_only=False) == {}
    assert chat(proxy.client(), "chat")  # and the next model starts normally
    assert set(containers(docker_engine, proxy.instance, running_only=False)) == {"chat"}


# --- 4. a client that goes away ------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_cancels_the_generation(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    client = proxy.client()
    chat(client, "long")
    container = containers(docker_engine, proxy.instance)["long"]
    seen_processing: list[bool] = []

    def until_checked(progress: Streamed) -> bool:
        if progress.chunks == 50:
            seen_processing.append(processing(proxy, "long"))
            seen_processing.append(proxy.running()["long"]["in_flight"] >= 1)
        return progress.chunks < 100  # then hang up

    streamed = stream_chat(proxy.url, "long", LONG_TOKENS, on_event=until_checked)
    hung_up = time.monotonic()
    assert streamed.status == 200 and streamed.chunks == 100 and not streamed.done
    assert seen_processing == [True, True], "the generation was not running upstream mid-stream"

    # A full generation lasts tens of seconds: it must stop long before that.
    poll(lambda: not processing(proxy, "long"), 15, "llama-server to stop generating after the hang-up")
    stopped_after = time.monotonic() - hung_up
    logs = docker_engine.containers.get(container).logs().decode(errors="replace")
    assert "cancel task" in logs, f"llama-server did not cancel the task:\n{logs[-2000:]}"
    poll(lambda: proxy.running()["long"]["in_flight"] == 0, 10, "in_flight to drop back to 0")

    assert chat(client, "long")
    assert containers(docker_engine, proxy.instance)["long"] == container
    assert "Traceback" not in proxy.log()  # a client that leaves is no error
    print(f"generation stopped {stopped_after:.2f}s after the client hung up")


# --- 6. waiting for another model's stream -------------------------------------------------


def test_a_request_waits_for_the_stream_of_the_model_it_evicts(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    client = proxy.client()
    chat(client, "long")
    assert set(containers(docker_engine, proxy.instance)) == {"long"}

    streaming = threading.Event()
    streamed: list[Streamed] = []
    samples: list[tuple[float, frozenset[str]]] = []  # (time the list call returned, running models)
    big: dict[str, Any] = {}
    states: list[dict[str, str]] = []
    stop_sampling = threading.Event()

    def stream_long() -> None:
        def note(progress: Streamed) -> bool:
            streaming.set()
            return True

        streamed.append(stream_chat(proxy.url, "long", WAIT_TOKENS, on_event=note, timeout=120))

    def ask_big() -> None:
        big["sent"] = time.monotonic()
        big["response"] = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "big", "messages": MESSAGES, "max_tokens": 8},
            timeout=120,
        )
        big["answered"] = time.monotonic()

    def sample() -> None:
        for _ in range(2400):  # at most 2 minutes
            if stop_sampling.is_set():
                return
            models = running_models(docker_engine, proxy.instance)
            samples.append((time.monotonic(), models))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    streamer = threading.Thread(target=stream_long, daemon=True)
    streamer.start()
    try:
        assert streaming.wait(30), "the long stream never began"
        asker = threading.Thread(target=ask_big, daemon=True)
        asker.start()
        # the request for big waits: it is starting, long is leaving and still streams
        poll(lambda: proxy.running()["big"]["state"] == "starting", 10, "big to be waiting to start")
        states.append({m: s["state"] for m, s in proxy.running().items()})
        streamer.join(120)
        asker.join(120)
    finally:
        stop_sampling.set()
        sampler.join(10)
    assert not streamer.is_alive() and not asker.is_alive()

    long_stream = streamed[0]
    assert long_stream.status == 200 and long_stream.error is None
    assert long_stream.finish_reason == "length" and long_stream.done, "long's stream was cut"
    assert states[0]["long"] == "leaving" and states[0]["big"] == "starting", states
    assert big["sent"] < long_stream.ended_at, "size WAIT_TOKENS up: the stream ended before big was asked"
    assert big["response"].status_code == 200, big["response"].text
    assert big["answered"] > long_stream.ended_at

    during = [models for at, models in samples if at < long_stream.ended_at]
    assert during, "no Docker sample during the stream"
    assert all(models == {"long"} for models in during), f"while long streamed, Docker ran: {during}"
    assert any(at > big["sent"] for at, _ in samples if at < long_stream.ended_at)
    assert set(containers(docker_engine, proxy.instance)) == {"big"}
    log = proxy.log()
    assert log.index("stopped long") < log.index("starting big ("), log


# --- 7. bad input ------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_leave_the_running_model_alone(
    start_proxy: ProxyFactory, docker_engine: docker.DockerClient
) -> None:
    proxy = start_proxy(maxRequestBytes=1024)
    chat(proxy.client(), "chat")
    before = containers(docker_engine, proxy.instance, running_only=False)
    assert set(before) == {"chat"}
    url = f"{proxy.url}/v1/chat/completions"
    headers = {"content-type": "application/json"}

    def oversized() -> Iterator[bytes]:  # no content-length: refused as it streams in
        yield b'{"model": "chat", "messages": [], "padding": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}'

    with httpx.Client(timeout=30) as http:
        cases: list[tuple[str, httpx.Response, int, str]] = [
            (
                "malformed JSON",
                http.post(url, content=b'{"model": "chat",', headers=headers),
                400,
                "invalid_json",
            ),
            ("not an object", http.post(url, content=b'["chat"]', headers=headers), 400, "invalid_json"),
            ("no model", http.post(url, json={"messages": MESSAGES}), 400, "missing_model"),
            (
                "model not a string",
                http.post(url, json={"model": 7, "messages": MESSAGES}),
                400,
                "missing_model",
            ),
            ("empty model", http.post(url, json={"model": "", "messages": MESSAGES}), 400, "missing_model"),
            (
                "oversized, declared",
                http.post(url, json={"model": "chat", "messages": MESSAGES, "pad": "x" * 2000}),
                413,
                "too_large",
            ),
            ("oversized, streamed", http.post(url, content=oversized(), headers=headers), 413, "too_large"),
            (
                "unknown model",
                http.post(url, json={"model": "nope", "messages": MESSAGES}),
                404,
                "model_not_found",
            ),
            ("unknown route", http.get(f"{proxy.url}/v2/nothing"), 404, "not_found"),
            ("unknown route, POST", http.post(f"{proxy.url}/v1/nothing", json={}), 404, "not_found"),
            ("wrong method", http.get(url), 405, "method_not_allowed"),
            ("wrong method, fixed route", http.delete(f"{proxy.url}/v1/models"), 405, "method_not_allowed"),
        ]
        for what, response, status, code in cases:
            try:
                error = assert_openai_error(response, status, code)
            except AssertionError as failure:
                raise AssertionError(f"{what}: {failure}") from None
            assert error["type"] == "invalid_request_error", (what, error)
        assert "maxRequestBytes (1024 bytes)" in cases[5][1].json()["error"]["message"]
        assert "nope" in cases[7][1].json()["error"]["message"]

    assert containers(docker_engine, proxy.instance, running_only=False) == before
    running = proxy.running()
    assert running["chat"]["state"] == "ready" and running["chat"]["in_flight"] == 0
    assert chat(proxy.client(), "chat")
    assert containers(docker_engine, proxy.instance, running_only=False) == before
    assert "starting " not in proxy.log().split("starting chat (", 1)[1]


def test_the_upstream_passthrough_forwards_a_get_without_a_body(
    proxy: Proxy, docker_engine: docker.DockerClient
) -> None:
    chat(proxy.client(), "chat")
    before = containers(docker_engine, proxy.instance)
    response = httpx.get(f"{proxy.url}/upstream/chat/slots", timeout=30)
    assert response.status_code == 200, response.text
    assert all("is_processing" in slot for slot in response.json())
    assert containers(docker_engine, proxy.instance) == before


# --- 5. the Docker daemon restarted (last: it restarts the engine under everything) --------

PID_FILE = Path("/var/run/docker.pid")


def _ping() -> bool:
    try:
        client = docker.from_env(timeout=5)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def _ensure_engine() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "docker-engine.sh")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, f"docker-engine.sh failed:\n{done.stdout}{done.stderr}"
    poll(_ping, 60, "the Docker daemon to answer /_ping")


def _dockerd_pid() -> int:
    pid = int(PID_FILE.read_text().strip())
    stat = Path(f"/proc/{pid}/stat").read_text()
    assert "(dockerd)" in stat, f"pid {pid} in {PID_FILE} is not dockerd: {stat}"
    return pid


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return "(dockerd)" not in stat or stat.split(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def engine_restart() -> Iterator[Callable[[], None]]:
    """Restart dockerd (TERM its pid, start it with scripts/docker-engine.sh); whatever
    happens, the engine answers again afterwards."""

    def restart() -> None:
        pid = _dockerd_pid()
        os.kill(pid, signal.SIGTERM)
        poll(lambda: _dead(pid), 60, f"dockerd {pid} to exit")
        _ensure_engine()

    try:
        yield restart
    finally:
        _ensure_engine()


def test_the_docker_daemon_restarted_under_a_running_proxy(
    proxy: Proxy, docker_engine: docker.DockerClient, engine_restart: Callable[[], None]
) -> None:
    client = proxy.client()
    first = chat(client, "chat")
    before = containers(docker_engine, proxy.instance)["chat"]
    assert proxy.process is not None
    serving = proxy.process.pid

    engine_restart()

    assert proxy.alive(), f"swapctl up died with the daemon:\n{proxy.log()}"
    assert chat(client, "chat") == first
    assert proxy.alive() and proxy.process is not None and proxy.process.pid == serving  # the same up
    engine = docker.from_env(timeout=30)  # a fresh client: the session's pooled connections died
    try:
        now = containers(engine, proxy.instance)
        assert set(now) == {"chat"}
        assert set(containers(engine, proxy.instance, running_only=False)) == {"chat"}
        if now["chat"] != before:  # the old one died with the daemon: removed, not left exited
            poll(lambda: gone(engine, before), 10, "the dead container to be removed")
    finally:
        engine.close()
    assert proxy.running()["chat"]["state"] == "ready"
    print(f"container {'replaced' if now['chat'] != before else 'kept'} across the daemon restart")
