"""WebSockets through a real `swapctl up` to real containers, with the `websockets` client.

The models run `scripts/ws_echo_server.py` (standard library only: the test image has python3
but no `websockets`) in the llama-server image: it echoes messages, closes with a code when
asked, tells the handshake it saw, and answers /health. The matrix lets one model run at a
time, so a request for `other` evicts `echo`: an open socket to `echo` must hold it until
the socket closes. Docker is the witness of what runs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from support import Proxy, config_document, poll, running_models, write_yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

pytestmark = pytest.mark.docker

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
MATRIX = {"sets": {"echo_alone": "echo", "other_alone": "other"}}  # one at a time


def ws_echo_model(**keys: Any) -> dict[str, Any]:
    """A model whose container runs scripts/ws_echo_server.py in the llama-server image."""
    return {
        "template": "llama-server",
        "entrypoint": ["python3"],
        "command": ["/srv/ws_echo_server.py", "--port", "8080"],
        "volumes": [f"{SCRIPTS}:/srv:ro"],
        "health": "/health",
        "stop_grace_period": "1s",
        **keys,
    }


@pytest.fixture
def proxy(instance: str, tmp_path: Path, docker_engine: docker.DockerClient, proxies: list[Proxy]) -> Proxy:
    models = {"echo": ws_echo_model(aliases=["talk"]), "other": ws_echo_model()}
    path = write_yaml(tmp_path / "swapctl.yaml", config_document(instance, models, MATRIX))
    started = Proxy(path, instance, tmp_path)
    proxies.append(started)
    started.start()
    return started


@pytest.fixture
def running(proxy: Proxy, docker_engine: docker.DockerClient) -> Callable[[], frozenset[str]]:
    """What runs, as Docker sees it."""
    return lambda: running_models(docker_engine, proxy.instance)


def socket_to(proxy: Proxy, path: str, **options: Any) -> ClientConnection:
    """A WebSocket through the proxy; its model's start is part of the handshake's wait."""
    url = proxy.url.replace("http://", "ws://", 1) + path
    opened: ClientConnection = connect(url, proxy=None, open_timeout=60, **options)
    return opened


def test_text_and_binary_echo_both_ways_and_the_model_starts_on_first_connect(
    proxy: Proxy, running: Callable[[], frozenset[str]]
) -> None:
    assert running() == set()
    with socket_to(proxy, "/upstream/talk/socket/path?x=1&y=two", subprotocols=["chat"]) as ws:
        assert running() == {"echo"}
        assert ws.subprotocol == "chat"
        ws.send("héllo, model")
        assert ws.recv() == "héllo, model"
        blob = bytes(range(256)) * 400  # 100 KiB, several frames' worth on the way
        ws.send(blob)
        assert ws.recv() == blob
        ws.send("whoami")
        seen = json.loads(ws.recv())
        assert proxy.running()["echo"]["in_flight"] == 1  # the socket holds its model
    assert seen["path"] == "/socket/path?x=1&y=two"
    assert seen["subprotocol"] == "chat"
    assert ["sec-websocket-protocol", "chat"] in seen["headers"]
    poll(lambda: proxy.running()["echo"]["in_flight"] == 0, 10, "the socket's hold released")


def test_the_servers_close_code_and_reason_reach_the_client(proxy: Proxy) -> None:
    with socket_to(proxy, "/v1/realtime?model=echo") as ws:
        ws.send("close 4002 the model is done")
        with pytest.raises(ConnectionClosed) as raised:
            ws.recv()
    rcvd = raised.value.rcvd
    assert rcvd is not None and (rcvd.code, rcvd.reason) == (4002, "the model is done")
    with socket_to(proxy, "/upstream/echo/") as ws:
        ws.send("ping")
        assert ws.recv() == "ping"
        ws.close(4001, "the client is done")
    assert (ws.close_code, ws.close_reason) == (4001, "the client is done")
    poll(lambda: proxy.running()["echo"]["in_flight"] == 0, 10, "the socket's hold released")


def test_an_open_socket_holds_its_model_while_a_request_that_evicts_it_waits(
    proxy: Proxy, running: Callable[[], frozenset[str]]
) -> None:
    answers: list[httpx.Response] = []
    with socket_to(proxy, "/upstream/echo/") as ws:
        ws.send("first")
        assert ws.recv() == "first"
        evicting = threading.Thread(
            target=lambda: answers.append(httpx.get(f"{proxy.url}/upstream/other/health", timeout=60))
        )
        evicting.start()
        poll(lambda: proxy.running()["echo"]["state"] == "leaving", 30, "echo chosen to stop")
        for word in ("still", "here"):  # the eviction waits for the socket: it is not cut
            ws.send(word)
            assert ws.recv() == word
        assert answers == [] and running() == {"echo"}
    evicting.join(60)
    assert [answer.status_code for answer in answers] == [200], answers
    assert running() == {"other"}


def test_upstream_model_without_its_slash_redirects_without_starting_it(
    proxy: Proxy, running: Callable[[], frozenset[str]]
) -> None:
    answer = httpx.get(f"{proxy.url}/upstream/talk?a=1", timeout=10)
    assert answer.status_code == 308 and answer.headers["location"] == "./talk/?a=1"
    assert running() == set()
    followed = httpx.get(f"{proxy.url}/upstream/talk?a=1", timeout=60, follow_redirects=True)
    assert followed.status_code == 200 and followed.json() == {"path": "/?a=1"}
    assert str(followed.url) == f"{proxy.url}/upstream/talk/?a=1"
    assert running() == {"echo"}
