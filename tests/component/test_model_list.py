"""The model list, one model's entry and llama.cpp's router API, over the fake engine: what
the list shows, each status as the lifecycle moves (its slow steps held at gates), unlisted
models, aliases and variants as entries, and the router's answers and errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
import yaml
from gated import GatedWorld
from support import FakeStack

from swapctl.backend.fake import FakeModel
from swapctl.config import json_schema, parse_config
from swapctl.errors import ConfigError
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream

pytestmark = pytest.mark.anyio

CONFIG: dict[str, Any] = {
    "instance": "test",
    "models": {
        "chat": {
            "image": "img",
            "name": "Chat, small",
            "description": "Answers briefly.",
            "metadata": {"context": 8192, "released": "2024-05-01", "tags": ["fast", {"tools": True}]},
            "aliases": ["gpt-4o-mini", "small"],
            "filters": {"setParamsByID": {"chat-cold": {"temperature": 0}}},
        },
        "org/code": {"image": "img"},
        "hidden": {"image": "img", "unlisted": True, "aliases": ["secret"]},
        "broken": {"image": "img"},
    },
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def stack() -> AsyncIterator[FakeStack]:
    found = FakeStack(CONFIG)
    found.backend.behaviour["broken"] = FakeModel(exit_at_start="fatal: no such file /models/x.gguf")
    yield found
    await found.close()


class Gated:
    """The app over a swapper whose slow steps (`held`) wait at gates the test opens."""

    def __init__(self, config: dict[str, Any], held: tuple[str, ...]) -> None:
        self.world = GatedWorld(parse_config(config), held)
        swapper = self.world.swapper
        app = build_app(swapper.config, swapper, HttpxUpstream(self.world.client), swapper.metrics)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")

    def state(self, model: str) -> str:
        """swapctl's own name of the model's state."""
        return self.world.swapper.slots[model].state.value

    async def statuses(self) -> dict[str, str]:
        listed = (await self.client.get("/v1/models")).json()["data"]
        return {entry["id"]: entry["status"]["value"] for entry in listed}

    async def close(self) -> None:
        await self.world.close()
        await self.world.swapper.unload()
        await self.client.aclose()


def assert_openai_error(response: httpx.Response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    for word in words:
        assert word in error["message"]


async def test_the_list_shows_each_listed_model_with_its_names_metadata_and_status(stack: FakeStack) -> None:
    response = await stack.client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    entries = {entry["id"]: entry for entry in body["data"]}
    assert list(entries) == ["chat", "chat-cold", "org/code", "broken"]  # no hidden, no aliases
    created = entries["chat"]["created"]
    assert isinstance(created, int)
    assert entries["chat"] == {
        "id": "chat",
        "object": "model",
        "created": created,
        "owned_by": "swapctl",
        "name": "Chat, small",
        "description": "Answers briefly.",
        "aliases": ["gpt-4o-mini", "small"],
        "status": {"value": "unloaded"},
        "meta": {"llamaswap": {"context": 8192, "released": "2024-05-01", "tags": ["fast", {"tools": True}]}},
    }
    # a variant is its model's entry under its own id; a model with no keys set has none of them
    assert entries["chat-cold"] == {**entries["chat"], "id": "chat-cold"}
    assert entries["org/code"] == {
        "id": "org/code",
        "object": "model",
        "created": created,
        "owned_by": "swapctl",
        "aliases": [],
        "status": {"value": "unloaded"},
    }
    # llama-server in router mode answers both paths alike; so does swapctl
    assert (await stack.client.get("/models")).json() == body


async def test_statuses_follow_a_load_and_an_unload(stack: FakeStack) -> None:
    load = await stack.client.post("/models/load", json={"model": "chat"})
    assert (load.status_code, load.json()) == (200, {"success": True})
    listed = (await stack.client.get("/models")).json()["data"]
    assert {e["id"]: e["status"]["value"] for e in listed} == {
        "chat": "loaded",
        "chat-cold": "loaded",
        "org/code": "unloaded",
        "broken": "unloaded",
    }
    # one model at a time (no matrix): loading another evicts it, as a request would
    assert (await stack.client.post("/models/load", json={"model": "org/code"})).status_code == 200
    assert stack.swapper.running() == ["org/code"]
    unload = await stack.client.post("/models/unload", json={"model": "org/code"})
    assert (unload.status_code, unload.json()) == (200, {"success": True})
    assert stack.swapper.running() == []
    assert {e["status"]["value"] for e in (await stack.client.get("/v1/models")).json()["data"]} == {
        "unloaded"
    }


async def test_loading_shows_while_the_image_is_looked_for_and_the_server_loads() -> None:
    gated = Gated(CONFIG, held=("image", "health"))
    try:
        load = asyncio.create_task(gated.client.post("/models/load", json={"model": "chat"}))
        await gated.world.waiting("image", "img")
        assert gated.state("chat") == "pulling"
        assert (await gated.statuses())["chat"] == "loading"
        gated.world.gates.open("image", "img")
        await gated.world.waiting("health", "chat")
        assert gated.state("chat") == "starting"
        assert (await gated.statuses())["chat"] == "loading"
        # loading already: llama-server's answer to a second load
        again = await gated.client.post("/models/load", json={"model": "small"})
        assert_openai_error(again, 400, "model_already_running", "chat", "loading")
        assert not load.done()  # a load answers once the model is loaded
        gated.world.gates.open("health", "chat")
        assert (await load).json() == {"success": True}
        assert (await gated.statuses())["chat"] == "loaded"
    finally:
        await gated.close()


async def test_leaving_and_stopping_read_as_unloaded() -> None:
    gated = Gated(CONFIG, held=("stop",))
    try:
        swapper = gated.world.swapper
        lease = await swapper.acquire("chat")  # a request in flight
        unload = asyncio.create_task(gated.client.post("/models/unload", json={"model": "chat"}))
        await gated.world.settle()
        assert gated.state("chat") == "leaving"
        assert (await gated.statuses())["chat"] == "unloaded"
        assert not unload.done()  # an unload waits for the requests in flight
        await lease.release()
        await gated.world.waiting("stop", "chat")
        assert gated.state("chat") == "stopping"
        assert (await gated.statuses())["chat"] == "unloaded"
        gated.world.gates.open("stop", "chat")
        assert (await unload).json() == {"success": True}
        assert gated.state("chat") == "stopped"
    finally:
        await gated.close()


async def test_a_model_put_to_sleep_reads_as_sleeping_and_a_load_wakes_it() -> None:
    config = {"instance": "test", "models": {"a": {"image": "img", "sleep": 1}, "b": {"image": "img"}}}
    gated = Gated(config, held=())
    try:
        assert (await gated.client.post("/models/load", json={"model": "a"})).status_code == 200
        assert (await gated.client.post("/models/load", json={"model": "b"})).status_code == 200
        assert await gated.statuses() == {"a": "sleeping", "b": "loaded"}
        assert (await gated.client.post("/models/load", json={"model": "a"})).status_code == 200
        assert await gated.statuses() == {"a": "loaded", "b": "unloaded"}
    finally:
        await gated.close()


async def test_an_unlisted_model_is_found_by_name_and_serves(stack: FakeStack) -> None:
    listed = [entry["id"] for entry in (await stack.client.get("/v1/models")).json()["data"]]
    assert "hidden" not in listed and "secret" not in listed
    found = await stack.client.get("/v1/models/hidden")
    assert found.status_code == 200
    assert found.json()["id"] == "hidden"
    assert (await stack.client.get("/v1/models/secret")).json()["id"] == "secret"
    chat = {"model": "secret", "messages": [{"role": "user", "content": "hi"}]}
    assert (await stack.client.post("/v1/chat/completions", json=chat)).status_code == 200
    assert (await stack.client.get("/v1/models/hidden")).json()["status"] == {"value": "loaded"}


async def test_include_aliases_in_list_adds_an_entry_for_each_alias() -> None:
    stack = FakeStack({**CONFIG, "includeAliasesInList": True})
    try:
        entries = {entry["id"]: entry for entry in (await stack.client.get("/v1/models")).json()["data"]}
        assert list(entries) == ["chat", "gpt-4o-mini", "small", "chat-cold", "org/code", "broken"]
        assert entries["small"] == {**entries["chat"], "id": "small"}
    finally:
        await stack.close()


async def test_one_model_by_id_alias_variant_or_slashed_id(stack: FakeStack) -> None:
    listed = {entry["id"]: entry for entry in (await stack.client.get("/v1/models")).json()["data"]}
    for name, model in [
        ("chat", "chat"),
        ("gpt-4o-mini", "chat"),
        ("chat-cold", "chat"),
        ("org/code", "org/code"),
    ]:
        response = await stack.client.get(f"/v1/models/{name}")
        assert response.status_code == 200
        assert response.json() == {**listed[model], "id": name}
    assert (await stack.client.get("/v1/models/org%2Fcode")).json()["id"] == "org/code"


async def test_an_unknown_model_is_a_404_in_the_openai_shape(stack: FakeStack) -> None:
    assert_openai_error(await stack.client.get("/v1/models/nope"), 404, "model_not_found", "nope")
    assert_openai_error(await stack.client.get("/v1/models/org/nope"), 404, "model_not_found", "org/nope")
    for route in ("/models/load", "/models/unload"):
        response = await stack.client.post(route, json={"model": "nope"})
        assert_openai_error(response, 404, "model_not_found", "nope")
    assert stack.swapper.running() == []


async def test_the_router_refuses_what_llama_server_refuses(stack: FakeStack) -> None:
    not_running = await stack.client.post("/models/unload", json={"model": "chat"})
    assert_openai_error(not_running, 400, "model_not_running", "chat", "not running")
    assert (await stack.client.post("/models/load", json={"model": "gpt-4o-mini"})).status_code == 200
    again = await stack.client.post("/models/load", json={"model": "chat"})
    assert_openai_error(again, 400, "model_already_running", "chat", "loaded")
    assert_openai_error(await stack.client.post("/models/load", json={}), 400, "missing_model")
    assert_openai_error(await stack.client.post("/models/load", content=b"{"), 400, "invalid_json")
    assert stack.swapper.running() == ["chat"]


async def test_a_failed_load_is_a_502_naming_the_cause(stack: FakeStack) -> None:
    response = await stack.client.post("/models/load", json={"model": "broken"})
    assert_openai_error(response, 502, "model_start_failed", "broken", "no such file")
    # marked as llama-server marks a model whose process exited in error, until a start works
    assert (await stack.client.get("/v1/models/broken")).json()["status"] == {
        "value": "unloaded",
        "failed": True,
    }
    assert (await stack.client.get("/models")).json()["data"][-1]["status"]["failed"] is True
    stack.backend.behaviour["broken"] = FakeModel()  # its file is there now
    assert (await stack.client.post("/models/load", json={"model": "broken"})).status_code == 200
    assert (await stack.client.post("/models/unload", json={"model": "broken"})).status_code == 200
    assert (await stack.client.get("/v1/models/broken")).json()["status"] == {"value": "unloaded"}


async def test_wrong_methods_are_405_and_models_is_never_forwarded(stack: FakeStack) -> None:
    for method, path in [
        ("GET", "/models/load"),
        ("GET", "/models/unload"),
        ("POST", "/models"),
        ("POST", "/v1/models"),
        ("DELETE", "/v1/models/chat"),
    ]:
        response = await stack.client.request(method, path)
        assert_openai_error(response, 405, "method_not_allowed")
    # `?model=` once forwarded GET /models to the model; it is the list now, and starts nothing
    listed = await stack.client.get("/models", params={"model": "chat"})
    assert listed.json()["object"] == "list"
    assert stack.swapper.running() == []


async def test_the_openai_sdk_lists_and_retrieves(stack: FakeStack) -> None:
    await stack.use("org/code")
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=stack.app))  # the SDK's own httpx
    client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="none", http_client=http)
    try:
        models = [model async for model in client.models.list()]
        assert [m.id for m in models] == ["chat", "chat-cold", "org/code", "broken"]
        status = {m.id: (m.model_extra or {})["status"]["value"] for m in models}
        assert status == {
            "chat": "unloaded",
            "chat-cold": "unloaded",
            "org/code": "loaded",
            "broken": "unloaded",
        }
        found = await client.models.retrieve("org/code")
        assert (found.id, found.owned_by) == ("org/code", "swapctl")
        hidden = await client.models.retrieve("hidden")
        assert hidden.id == "hidden"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")
    finally:
        await client.close()


def test_metadata_is_returned_as_json_whatever_yaml_wrote() -> None:
    text = "released: 2024-05-01\n1: one\nnull: none\nat: 2001-12-14 21:59:43.10 -5\nlist: [1, 2.5, {true: yes}]\n"
    config = parse_config({"models": {"m": {"image": "i", "metadata": yaml.safe_load(text)}}}, environ={})
    assert config.models["m"].metadata == {
        "released": "2024-05-01",
        "1": "one",
        "null": "none",
        "at": "2001-12-14T21:59:43.100000-05:00",
        "list": [1, 2.5, {"true": True}],
    }


@pytest.mark.parametrize(
    ("model", "path", "words"),
    [
        ("metadata: {a: {b: [1, .nan]}}", "models.m.metadata.a.b.1", "NaN or infinity"),
        ("metadata: {blob: !!binary aGk=}", "models.m.metadata.blob", "binary"),
        ("metadata: [1, 2]", "models.m.metadata", "mapping"),
        ("metadata: {1: a, '1': b}", "models.m.metadata", "'1'"),
        ("name: [x]", "models.m.name", "string"),
        ("description: 3", "models.m.description", "string"),
        ("unlisted: maybe", "models.m.unlisted", "boolean"),
    ],
)
def test_a_wrong_list_key_names_its_key_path(model: str, path: str, words: str) -> None:
    raw = yaml.safe_load(f"models:\n  m: {{image: i, {model}}}\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(raw, environ={})
    assert caught.value.path == path
    assert words in caught.value.message
    with pytest.raises(ConfigError) as caught:
        parse_config({"includeAliasesInList": "yes", "models": {"m": {"image": "i"}}}, environ={})
    assert caught.value.path == "includeAliasesInList"


def test_the_schema_describes_the_keys() -> None:
    schema = json_schema()
    model = schema["$defs"]["ModelConfig"]["properties"]
    for key in ("name", "description", "metadata", "unlisted"):
        assert model[key]["description"]
    assert "alias" in schema["properties"]["includeAliasesInList"]["description"]
