"""Models served elsewhere: `proxy:` models and peers, over the fake engine. The peer here is
another swapctl app (a FakeStack) reached through httpx; the real ones, in network
namespaces, are in tests/real/test_two_boxes.py."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from support import FakeStack

from swapctl.backend.fake import FakeModel
from swapctl.config import Peer, Timeouts
from swapctl.config.filters import Filters
from swapctl.proxy.upstream import HttpxUpstream
from swapctl.remote import Watch
from swapctl.server import build_server

pytestmark = pytest.mark.anyio
PEER = "http://peer-a.test:8080"
OTHER_PEER = "http://peer-b.test:8080"
API = "https://api.test"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Hosts(httpx.AsyncBaseTransport):
    """A network of named servers, each an ASGI app or a handler; one taken away refuses."""

    def __init__(self) -> None:
        self.up: dict[str, httpx.AsyncBaseTransport] = {}
        self.seen: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        server = self.up.get(request.url.host)
        if server is None:
            raise httpx.ConnectError("connection refused", request=request)
        response = await server.handle_async_request(request)
        if response.is_stream_consumed:  # a handler's: served as a stream, as a socket would
            return httpx.Response(
                response.status_code, headers=response.headers, stream=httpx.ByteStream(response.content)
            )
        return response


async def api(request: httpx.Request) -> httpx.Response:
    """A hosted OpenAI-compatible API: it tells what it received."""
    body = json.loads(await request.aread() or b"{}")
    return httpx.Response(
        200, json={"path": request.url.path, "headers": dict(request.headers), "body": body}
    )


def peer_stack(models: dict[str, Any], matrix: dict[str, Any] | None = None) -> FakeStack:
    config: dict[str, Any] = {"instance": "peer", "models": models, "allowedHosts": ["*.test"]}
    if matrix:
        config["matrix"] = matrix
    return FakeStack(config)


class Front:
    """The swapctl under test, with peers and a hosted API on the fake network."""

    def __init__(self, config: dict[str, Any], peers: dict[str, FakeStack]) -> None:
        self.hosts = Hosts()
        self.peers = peers
        for host, stack in peers.items():
            self.hosts.up[host] = httpx.ASGITransport(app=stack.app)
        self.hosts.up["api.test"] = httpx.MockTransport(api)
        self.network = httpx.AsyncClient(transport=self.hosts)
        self.watch: Watch | None = None
        self.stack = FakeStack(config, elsewhere=HttpxUpstream(self.network), watch=self._watch())

    def _watch(self) -> Watch:
        self.watch = Watch(lambda: self.stack.swapper.config.peers, self.network)
        return self.watch

    async def probe(self) -> None:
        assert self.watch is not None
        for place in list(self.watch.places.values()):
            await self.watch.probe(place)

    def down(self, host: str) -> None:
        del self.hosts.up[host]

    async def close(self) -> None:
        await self.stack.close()
        for stack in self.peers.values():
            await stack.close()
        await self.network.aclose()


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    peer = peer_stack(
        {"big": {"image": "img"}, "shared": {"image": "img"}, "rival": {"image": "img"}},
        {"sets": {"a": "big", "b": "shared", "c": "rival"}},
    )
    config = {
        "instance": "front",
        "models": {
            "chat": {"image": "img"},
            "shared": {"image": "img", "aliases": ["shared-alias"]},
            "gpt": {
                "proxy": API,
                "apiKey": "sk-remote",
                "aliases": ["gpt-4o"],
                "useModelName": "gpt-4o-2024",
                "filters": {"setParams": {"temperature?": 0.5}},
            },
        },
        "matrix": {"sets": {"one": "chat", "two": "shared"}},
        "peers": {"a": {"proxy": PEER, "filters": {"stripParams": "top_p", "setParams": {"seed?": 7}}}},
        "apiKeys": ["sk-front"],
    }
    found = Front(config, {"peer-a.test": peer})
    await found.probe()
    yield found
    await found.close()


KEY = {"authorization": "Bearer sk-front"}


async def test_a_proxy_model_gets_its_own_key_name_and_filters(front: Front) -> None:
    answer = await front.stack.client.post(
        "/v1/chat/completions", json={"model": "gpt-4o", "messages": []}, headers=KEY
    )
    assert answer.status_code == 200, answer.text
    seen = answer.json()
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["authorization"] == "Bearer sk-remote"  # the client's key is swapctl's
    assert "x-swapctl-via" in seen["headers"]
    assert seen["body"] == {"model": "gpt-4o-2024", "messages": [], "temperature": 0.5}
    assert front.stack.backend.boxes == {}  # nothing started for it


async def test_the_list_shows_every_place_and_its_state(front: Front) -> None:
    listed = (await front.stack.client.get("/v1/models", headers=KEY)).json()["data"]
    status = {entry["id"]: entry["status"]["value"] for entry in listed}
    assert status == {
        "chat": "unloaded",
        "shared": "unloaded",
        "gpt": "loaded",
        "big": "unloaded",
        "rival": "unloaded",
    }
    big = next(entry for entry in listed if entry["id"] == "big")
    assert big["meta"] == {"llamaswap": {"peer": "a"}}  # models: auto, as the peer listed them
    # a request for the peer's model loads it there; the next probe says so
    answer = await front.stack.client.post(
        "/v1/chat/completions", json={"model": "big", "messages": []}, headers=KEY
    )
    assert answer.status_code == 200, answer.text
    assert front.peers["peer-a.test"].backend.running_models() == {"big"}
    await front.probe()
    listed = (await front.stack.client.get("/v1/models", headers=KEY)).json()["data"]
    assert {e["id"]: e["status"]["value"] for e in listed}["big"] == "loaded"
    one = await front.stack.client.get("/v1/models/big", headers=KEY)
    assert one.json()["status"] == {"value": "loaded"}


async def test_a_model_offered_here_and_there_goes_where_it_is_loaded(front: Front) -> None:
    peer = front.peers["peer-a.test"]
    await peer.use("shared")
    await front.probe()
    answer = await front.stack.client.post(
        "/v1/chat/completions", json={"model": "shared-alias", "messages": []}, headers=KEY
    )
    assert answer.status_code == 200
    assert front.stack.backend.running_models() == set()  # not started here
    assert answer.json()["model"] == "shared"  # the peer got the ID: it knows no alias of ours


async def test_cold_everywhere_it_goes_where_the_plan_evicts_least(front: Front) -> None:
    peer = front.peers["peer-a.test"]
    await front.stack.use("chat")  # here, 'shared' would evict chat (cost 1)
    await front.probe()  # there, 'shared' evicts nothing
    answer = await front.stack.client.post(
        "/v1/chat/completions", json={"model": "shared", "messages": []}, headers=KEY
    )
    assert answer.status_code == 200
    assert peer.backend.running_models() == {"shared"}
    assert front.stack.backend.running_models() == {"chat"}
    # with the peer busy with another model (it would evict it: cost 1), a tie: here first
    await front.stack.client.post("/unload/chat", headers=KEY)
    await peer.client.post("/unload")
    await peer.use("rival")
    await front.probe()
    await front.stack.client.post(
        "/v1/chat/completions", json={"model": "shared", "messages": []}, headers=KEY
    )
    assert front.stack.backend.running_models() == {"shared"}


async def test_concurrent_requests_never_load_a_model_in_two_places() -> None:
    peers = {host: peer_stack({"m": {"image": "img"}}) for host in ("peer-a.test", "peer-b.test")}
    for stack in peers.values():
        stack.backend.behaviour["m"] = FakeModel(ready_after=0.2)
    config = {"instance": "front", "models": {}, "peers": {"a": {"proxy": PEER}, "b": {"proxy": OTHER_PEER}}}
    front = Front(config, peers)
    try:
        await front.probe()
        body = {"model": "m", "messages": []}
        answers = await asyncio.gather(
            *(front.stack.client.post("/v1/chat/completions", json=body) for _ in range(8))
        )
        assert [a.status_code for a in answers] == [200] * 8
        loaded = [host for host, stack in peers.items() if stack.backend.running_models()]
        assert loaded == ["peer-a.test"]  # one place, the first written
    finally:
        await front.close()


async def test_a_peer_that_does_not_answer_is_a_502_naming_it_then_skipped_until_it_answers(
    front: Front, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "swapctl")
    front.down("peer-a.test")
    body = {"model": "big", "messages": []}
    first = await front.stack.client.post("/v1/chat/completions", json=body, headers=KEY)
    assert first.status_code == 502
    assert "peer 'a' did not answer" in first.json()["error"]["message"]
    assert first.json()["error"]["code"] == "upstream_unavailable"
    await front.probe()  # the second failure in a row opens its circuit
    assert "peer 'a' is not answering" in caplog.text
    seen = len(front.hosts.seen)
    fast = await front.stack.client.post("/v1/chat/completions", json=body, headers=KEY)
    assert fast.status_code == 502 and "no place that serves it answers" in fast.json()["error"]["message"]
    assert len(front.hosts.seen) == seen  # nothing was sent to it
    listed = (await front.stack.client.get("/v1/models", headers=KEY)).json()["data"]
    assert {e["id"]: e["status"]["value"] for e in listed}["big"] == "unloaded"
    # it answers again: the next probe closes the circuit
    front.hosts.up["peer-a.test"] = httpx.ASGITransport(app=front.peers["peer-a.test"].app)
    await front.probe()
    assert "peer 'a' answers again" in caplog.text
    again = await front.stack.client.post("/v1/chat/completions", json=body, headers=KEY)
    assert again.status_code == 200


async def test_a_request_that_comes_back_is_refused(front: Front) -> None:
    sent = await front.stack.client.post("/v1/chat/completions", json={"model": "gpt"}, headers=KEY)
    node = sent.json()["headers"]["x-swapctl-via"]  # this swapctl's node, as it sends it on
    loop = await front.stack.client.post(
        "/v1/chat/completions",
        json={"model": "big", "messages": []},
        headers={**KEY, "x-swapctl-via": f"elsewhere, {node}"},
    )
    assert loop.status_code == 508
    assert loop.json()["error"]["code"] == "loop_detected"
    assert f"elsewhere -> {node}" in loop.json()["error"]["message"]
    # one from another swapctl is sent on with its path so far
    on = await front.stack.client.post(
        "/v1/chat/completions", json={"model": "gpt"}, headers={**KEY, "x-swapctl-via": "elsewhere"}
    )
    assert on.json()["headers"]["x-swapctl-via"] == f"elsewhere, {node}"
    # and one for a model this box has is served here, never sent on
    here = await front.stack.client.post(
        "/v1/chat/completions",
        json={"model": "shared", "messages": []},
        headers={**KEY, "x-swapctl-via": "elsewhere"},
    )
    assert here.status_code == 200 and front.stack.backend.running_models() == {"shared"}


async def test_a_peers_model_through_upstream_and_query(front: Front) -> None:
    answer = await front.stack.client.get("/upstream/big/props?x=1", headers=KEY)
    assert answer.status_code == 200  # the peer's own passthrough to its container
    seen = [r for r in front.hosts.seen if r.url.host == "peer-a.test" and "props" in r.url.path]
    assert seen[-1].url.raw_path == b"/upstream/big/props?x=1"
    query = await front.stack.client.get("/props", params={"model": "big"}, headers=KEY)
    assert query.status_code == 200


async def test_commands_refuse_proxy_models_with_a_reason(front: Front) -> None:
    plan = await front.stack.client.get("/plan/gpt", headers=KEY)
    assert plan.status_code == 400 and "served elsewhere" in plan.json()["error"]["message"]
    load = await front.stack.client.post("/models/load", json={"model": "big"}, headers=KEY)
    assert load.status_code == 400 and load.json()["error"]["code"] == "model_elsewhere"


async def test_running_and_events_show_the_models_served_elsewhere(front: Front) -> None:
    rows = {
        row["model"]: row for row in (await front.stack.client.get("/running", headers=KEY)).json()["models"]
    }
    assert rows["gpt"]["place"] == "proxy" and rows["gpt"]["state"] == "ready"
    assert rows["big"]["place"] == "a" and rows["big"]["state"] == "stopped"
    assert rows["big"]["container"] is None and "place" not in rows["chat"]
    assert "shared" in rows and "place" not in rows["shared"]  # here too: this box's own row
    events: list[dict[str, Any]] = []
    activity = front.stack.swapper.activity
    with activity.subscribe({"model"}) as subscription:
        await front.peers["peer-a.test"].use("big")
        await front.probe()  # the peer now lists big as loaded: its row goes out
        async with asyncio.timeout(5):
            event = await anext(subscription)
        events.append(event.data)
    assert events[0]["model"] == "big" and events[0]["state"] == "ready" and events[0]["place"] == "a"


async def test_a_peer_that_hangs_delays_no_other_peers_probes() -> None:
    asked: list[str] = []

    async def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/events":  # not a swapctl: no event stream to follow
            return httpx.Response(404)
        asked.append(request.url.host)
        if request.url.host == "hung.test":
            await asyncio.sleep(60)  # accepted, never answered
        return httpx.Response(
            200, json={"object": "list", "data": [{"id": "m", "status": {"value": "loaded"}}]}
        )

    peers = {
        "hung": Peer("hung", "http://hung.test", None, None, Timeouts(1, None, None), Filters()),
        "fine": Peer("fine", "http://fine.test", None, None, Timeouts(1, None, None), Filters()),
    }
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        watch = Watch(lambda: peers, client, interval=0.02, probe_timeout=30)
        running = asyncio.create_task(watch.run())
        try:
            async with asyncio.timeout(5):
                while asked.count("fine.test") < 5:
                    await asyncio.sleep(0.01)
        finally:
            running.cancel()
    assert asked.count("hung.test") == 1  # still waiting on its first probe
    assert watch.places["fine"].statuses == {"m": "loaded"}


async def test_a_peers_filters_change_what_it_is_sent(front: Front) -> None:
    body = {"model": "big", "messages": [], "top_p": 0.5}
    answer = await front.stack.client.post("/v1/chat/completions", json=body, headers=KEY)
    assert answer.status_code == 200
    sent = next(r for r in reversed(front.hosts.seen) if r.url.path == "/v1/chat/completions")
    assert json.loads(sent.content) == {"model": "big", "messages": [], "seed": 7}


async def test_a_swapctl_peers_own_events_keep_its_states_live_between_probes() -> None:
    """The peer under the real uvicorn server `up` builds: the front follows its /events, so a
    model it loads shows as loaded at once, with no probe."""
    peer = peer_stack({"big": {"image": "img"}})
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    url = f"http://127.0.0.1:{listening.getsockname()[1]}"
    server = build_server(peer.app, "127.0.0.1", 0, verbose=False, closing=peer.swapper.activity.close)
    serving = asyncio.create_task(server.serve(sockets=[listening]))
    peers = {"p": Peer("p", url, None, None, Timeouts(1, None, None), Filters())}
    async with httpx.AsyncClient() as client:
        watch = Watch(lambda: peers, client, interval=3600)  # no second probe in this test
        place = watch.places["p"]
        seen: list[str] = []
        watch.changed = lambda changed: seen.append(changed.statuses.get("big", ""))
        following = asyncio.create_task(watch.follow(place))
        try:
            async with asyncio.timeout(10):
                while place.statuses.get("big") != "unloaded":  # the snapshot
                    await asyncio.sleep(0.01)
                await peer.use("big")
                while place.statuses.get("big") != "loaded":
                    await asyncio.sleep(0.01)
                assert seen[0] == "unloaded" and seen[-1] == "loaded"
                server.should_exit = True  # the peer goes away: its stream ends
                await serving
                while place.followed:  # its probes say it all again
                    await asyncio.sleep(0.01)
        finally:
            following.cancel()
            server.should_exit = True
            await serving
            listening.close()
            await peer.close()
