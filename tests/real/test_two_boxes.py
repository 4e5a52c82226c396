"""Two boxes: this machine's `swapctl up` (the front, "a") and a peer ("b"): another
`swapctl up` in a network namespace of its own, driving a second real dockerd there
(tests/engines.py), so the front reaches it over a veth pair as it would reach another
machine (the rig: tests/peers.py). Both run real llama-server containers; the official
`openai` client talks to the front only.

    a (this machine, its local engine)     llm, shared           one at a time
    b (the namespace, its own engine)      big, shared, talk     one at a time

Faults: the peer stopped (`kill -STOP`: connections accepted, nothing answered), its link
down, its packets dropped; and a loop between the two.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from openai import OpenAI
from peers import SLOW_START, Boxes, poll, two_boxes
from websockets.sync.client import connect

pytestmark = pytest.mark.docker


def streamed(client: OpenAI, model: str) -> str:
    """A streamed chat through the official client: its text (it raises on an error event)."""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=8, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text, f"{model}: an empty stream"
    return text


@pytest.fixture(scope="module")
def boxes(
    docker_engine: docker.DockerClient, models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Boxes]:
    with two_boxes(docker_engine, models_dir, tmp_path_factory.mktemp("peers")) as rig:
        yield rig


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


@pytest.mark.storm  # over a minute: the long tier
def test_a_peers_cold_start_longer_than_a_minute_is_waited_for(boxes: Boxes) -> None:
    """llama-swap cuts a peer's answer after 60 s without its head; swapctl's default for a
    peer's responseHeader is no limit, as the peer may be starting the model first."""
    began = time.monotonic()
    answer = httpx.post(
        f"{boxes.a.url}/v1/chat/completions",
        json={"model": "slow", "messages": [{"role": "user", "content": "Hi"}]},
        timeout=SLOW_START * 3,
    )
    took = time.monotonic() - began
    assert answer.status_code == 200, answer.text
    assert answer.json()["path"] == "/v1/chat/completions"  # the echo server's own answer
    assert took > SLOW_START
    assert "slow" in boxes.running_there()
