"""Hosts in the lifecycle, over two fake engines: this machine's and a host's (`gpu2`), each
driven by a swapper of its own with its own matrix; the proxy in front of both. The real
second dockerd is in tests/real/test_hosts_serving.py."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from swapctl.backend.fake import FakeBackend
from swapctl.config import parse_config
from swapctl.lifecycle import Fleet, Swapper
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream

pytestmark = pytest.mark.anyio
HOST_PORTS = 41000  # the host's fake containers' ports start here, this machine's at 40000

CONFIG: dict[str, Any] = {
    "instance": "test",
    "hosts": {
        "gpu2": {
            "docker": "tcp://10.0.0.2:2376",
            "tls": {"verify": False},
            "matrix": {"sets": {"alone": "big", "with": "both"}},  # one at a time there
        }
    },
    "models": {
        "chat": {"image": "img"},
        "big": {"image": "img", "hosts": ["gpu2"], "aliases": ["large"]},
        "both": {"image": "img", "hosts": ["local", "gpu2"]},
    },
    "matrix": {"sets": {"one": "chat", "two": "both"}},  # one at a time here too
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ByPort(httpx.AsyncBaseTransport):
    """The two fake engines' containers on one network: by their port."""

    def __init__(self, here: FakeBackend, there: FakeBackend) -> None:
        self.here, self.there = here, there

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        engine = self.there if (request.url.port or 0) >= HOST_PORTS else self.here
        return await engine.transport.handle_async_request(request)


class Boxes:
    def __init__(self) -> None:
        self.config = parse_config(CONFIG)
        self.here, self.there = FakeBackend(), FakeBackend()
        self.there._ids = itertools.count(HOST_PORTS - 40000)
        self.network = httpx.AsyncClient(transport=ByPort(self.here, self.there))
        local = Swapper(self.config.on("local"), self.here, self.network)
        gpu2 = Swapper(self.config.on("gpu2"), self.there, self.network)
        self.fleet = Fleet(self.config, {"local": local, "gpu2": gpu2})
        app = build_app(self.config, local, HttpxUpstream(self.network), local.metrics, fleet=self.fleet)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")

    async def ask(self, model: str) -> httpx.Response:
        return await self.client.post("/v1/chat/completions", json={"model": model, "messages": []})

    async def close(self) -> None:
        await self.fleet.unload()
        await self.client.aclose()
        await self.network.aclose()


@pytest.fixture
async def boxes() -> AsyncIterator[Boxes]:
    found = Boxes()
    yield found
    await found.close()


def test_each_host_has_its_own_models_and_matrix() -> None:
    config = parse_config(CONFIG)
    assert list(config.on("local").models) == ["chat", "both"]
    assert list(config.on("gpu2").models) == ["big", "both"]
    assert config.on("gpu2").policy.summary() == "matrix with 2 sets (2 combinations)"
    assert config.resolve("large") == "big"  # names are the whole config's


async def test_a_model_of_another_host_starts_there(boxes: Boxes) -> None:
    answer = await boxes.ask("large")
    assert answer.status_code == 200, answer.text
    assert boxes.there.running_models() == {"big"} and boxes.here.running_models() == set()
    rows = {(r["model"], r.get("place")): r for r in (await boxes.client.get("/running")).json()["models"]}
    assert rows[("big", "gpu2")]["state"] == "ready"
    assert rows[("chat", None)]["state"] == "stopped"
    listed = {e["id"]: e["status"]["value"] for e in (await boxes.client.get("/v1/models")).json()["data"]}
    assert listed == {"chat": "unloaded", "big": "loaded", "both": "unloaded"}


async def test_the_last_hour_shows_another_hosts_models_ran_and_this_machines_requests(boxes: Boxes) -> None:
    assert (await boxes.ask("large")).status_code == 200
    history = (await boxes.client.get("/history")).json()
    assert [(s["model"], s["state"]) for s in history["states"]] == [
        ("big", "pulling"),
        ("big", "starting"),
        ("big", "ready"),
    ]
    assert sum(history["models"]["big"]["requests"]) == 1  # counted by this machine's proxy


async def test_a_model_on_two_hosts_goes_where_it_evicts_least(boxes: Boxes) -> None:
    await boxes.ask("chat")  # here, `both` would now evict chat: cost 1; on gpu2: 0
    await boxes.ask("both")
    assert boxes.there.running_models() == {"both"} and boxes.here.running_models() == {"chat"}
    await boxes.ask("both")  # loaded there: served there
    assert boxes.here.running_models() == {"chat"}
    await boxes.client.post("/unload")
    assert boxes.here.running_models() == set() and boxes.there.running_models() == set()
    await boxes.ask("both")  # a tie: this machine first, as `hosts` lists it
    assert boxes.here.running_models() == {"both"}


async def test_a_host_whose_engine_stops_answering_is_noticed_and_nothing_else_changes(
    boxes: Boxes, caplog: pytest.LogCaptureFixture
) -> None:
    await boxes.ask("chat")
    boxes.there.reachable = False
    await boxes.fleet._ping("gpu2", boxes.fleet.swappers["gpu2"])
    assert "host 'gpu2': its Docker engine does not answer" in caplog.text
    refused = await boxes.ask("big")
    assert refused.status_code == 503
    assert (
        "host 'gpu2'" in refused.json()["error"]["message"] and "'big'" in refused.json()["error"]["message"]
    )
    assert (await boxes.ask("both")).status_code == 200  # its other host serves it
    assert boxes.here.running_models() == {"both"} and boxes.there.running_models() == set()
    boxes.there.reachable = True
    await boxes.fleet._ping("gpu2", boxes.fleet.swappers["gpu2"])
    assert (await boxes.ask("big")).status_code == 200


async def test_swapctls_own_routes_reach_the_right_host(boxes: Boxes) -> None:
    loaded = await boxes.client.post("/models/load", json={"model": "big"})
    assert loaded.status_code == 200 and boxes.there.running_models() == {"big"}
    plan = (await boxes.client.get("/plan/big")).json()
    assert plan["running"] is True
    unloaded = await boxes.client.post("/unload/big")
    assert unloaded.json() == {"unloaded": ["big@gpu2"]}
    assert boxes.there.running_models() == set()


async def test_a_reload_gives_each_host_its_part(boxes: Boxes) -> None:
    changed = {**CONFIG, "models": {**CONFIG["models"], "big": {"image": "img2", "hosts": ["gpu2"]}}}
    changes = await boxes.fleet.reload(parse_config(changed))
    assert changes.replaced == ("big@gpu2",)
    assert boxes.fleet.swappers["gpu2"].config.models["big"].image == "img2"
    assert boxes.fleet.config.models["big"].image == "img2"


async def test_each_hosts_metrics_have_a_route_of_their_own(boxes: Boxes) -> None:
    await boxes.ask("big")
    there = (await boxes.client.get("/metrics/gpu2")).text
    here = (await boxes.client.get("/metrics")).text
    assert 'swapctl_model_in_flight{model="big"}' in there  # its lifecycle: the host's registry
    assert 'swapctl_model_in_flight{model="big"}' not in here
    assert 'swapctl_requests_total{code="200",model="big"} 1.0' in here  # requests: the proxy's
    missing = await boxes.client.get("/metrics/gpu9")
    assert missing.status_code == 404 and "gpu2" in missing.json()["error"]["message"]
