"""Component tests: reloading the config while serving, over the fake backend. What runs and
what clients get, before and after a reload; nothing in flight is cut."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from swapctl.backend.fake import FakeBackend, FakeModel
from swapctl.config import load_config
from swapctl.errors import ConfigError, UnknownModelError
from swapctl.lifecycle import Reloader, State, Swapper
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream

pytestmark = pytest.mark.anyio
BASE = "http://127.0.0.1:8080"
MATRIX = {
    "vars": {"c": "chat", "k": "code", "B": "big"},
    "evict_costs": {"B": 10},
    "sets": {"pair": "c & k", "alone": "B"},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def document(**changes: Any) -> dict[str, Any]:
    """The config file's content: three models and the matrix, with `changes` over them."""
    models = {name: {"image": "img", "stop_grace_period": 0} for name in ("chat", "code", "big")}
    return {"instance": "test", "models": models, "matrix": MATRIX, **changes}


class Harness:
    """A swapper serving the config file at `path`, the app over it, and its reloader."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.backend = FakeBackend()
        self.upstream = httpx.AsyncClient(transport=self.backend.transport)
        self.swapper = Swapper(load_config(path), self.backend, self.upstream)
        self.reloader = Reloader(path, self.swapper)
        app = build_app(
            self.swapper.config,
            self.swapper,
            HttpxUpstream(self.upstream),
            self.swapper.metrics,
            reload=self.reloader.reload,
        )
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)

    def write(self, **changes: Any) -> None:
        self.path.write_text(yaml.safe_dump(document(**changes), sort_keys=False))

    async def use(self, model: str) -> None:
        await (await self.swapper.acquire(model)).release()

    def container(self, model: str) -> str | None:
        slot = self.swapper.slots.get(model)
        return slot.container.id if slot and slot.container else None

    def state(self, model: str) -> State:
        return self.swapper.slots[model].state

    async def settle(self) -> None:
        """Wait for every swap and eviction under way."""
        while self.swapper.tasks:
            await asyncio.gather(*list(self.swapper.tasks))

    async def chat(self, model: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return await self.client.post("/v1/chat/completions", json=body)

    async def close(self) -> None:
        await self.client.aclose()
        await self.upstream.aclose()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    path = tmp_path / "swapctl.yaml"
    path.write_text(yaml.safe_dump(document(), sort_keys=False))
    found = Harness(path)
    yield found
    await found.close()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def gauges(metrics: str) -> str:
    """The state and in-flight gauges' samples."""
    return "\n".join(
        line
        for line in metrics.splitlines()
        if line.startswith(("swapctl_model_state{", "swapctl_model_in_flight{"))
    )


def with_model(name: str, **keys: Any) -> dict[str, Any]:
    models = dict(document()["models"])
    models[name] = {"image": "img", "stop_grace_period": 0, **keys}
    return models


async def test_unchanged_models_keep_their_container_and_a_changed_one_waits_for_its_requests(
    harness: Harness,
) -> None:
    await harness.use("chat")
    await harness.use("code")
    chat, code = harness.container("chat"), harness.container("code")
    held = await harness.swapper.acquire("code")  # a long stream, say
    harness.write(models=with_model("code", environment={"A": "2"}))
    changes = await harness.reloader.reload("test")
    assert (changes.replaced, changes.unchanged) == (("code",), ("chat", "big"))
    late = asyncio.create_task(harness.use("code"))  # waits for the new one, not refused
    await asyncio.sleep(0.05)
    assert harness.state("code") is State.LEAVING
    assert code in harness.backend.boxes  # the old container serves its request to the end
    await held.release()
    await asyncio.wait_for(late, timeout=5)
    await harness.settle()
    assert code not in harness.backend.boxes
    new = harness.container("code")
    assert new is not None and new != code
    assert harness.backend.boxes[new].spec.environment == {"A": "2"}
    assert harness.container("chat") == chat  # untouched: same container, no second start
    assert harness.backend.starts == {"chat": 1, "code": 2}


async def test_a_removed_model_finishes_its_requests_then_stops_and_disappears(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await harness.use("chat")
    await harness.use("code")
    held = await harness.swapper.acquire("code")
    harness.write(models={k: v for k, v in with_model("chat").items() if k != "code"}, matrix=None)
    caplog.set_level(logging.INFO, "swapctl")
    answer = await harness.client.post("/reload")
    assert answer.status_code == 200
    assert answer.json()["removed"] == ["code"]
    assert "reload (POST /reload): added: -; removed: code; replaced: -; unchanged: 2" in caplog.text
    with pytest.raises(UnknownModelError):
        await harness.swapper.acquire("code")  # refused at once, not queued behind the stop
    assert (await harness.chat("code")).status_code == 404
    models = (await harness.client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in models] == ["chat", "big"]
    assert harness.container("code") in harness.backend.boxes  # its request is not cut
    await held.release()
    await harness.settle()
    assert harness.backend.running_models() == {"chat"}
    running = (await harness.client.get("/running")).json()["models"]
    assert [m["model"] for m in running] == ["chat", "big"]
    samples = gauges((await harness.client.get("/metrics")).text)
    assert 'model="chat"' in samples
    assert 'model="code"' not in samples


async def test_a_model_removed_while_it_starts_serves_the_requests_that_joined_then_stops(
    harness: Harness,
) -> None:
    harness.backend.behaviour["code"] = FakeModel(ready_after=0.2)
    joined = asyncio.create_task(harness.use("code"))
    await asyncio.sleep(0.05)
    assert harness.state("code") is State.STARTING
    harness.write(models={k: v for k, v in document()["models"].items() if k != "code"}, matrix=None)
    assert (await harness.reloader.reload("test")).removed == ("code",)
    await asyncio.wait_for(joined, timeout=5)  # served by the container it started
    await harness.settle()
    await harness.swapper.check()
    assert harness.backend.running_models() == set()
    assert "code" not in harness.swapper.slots


async def test_keys_outside_the_container_spec_apply_to_the_next_request(harness: Harness) -> None:
    await harness.use("chat")
    chat = harness.container("chat")
    harness.write(models=with_model("chat", useModelName="renamed", aliases=["gpt-4o"]), maxRequestBytes=1024)
    changes = await harness.reloader.reload("test")
    assert changes.unchanged == ("chat", "code", "big")
    response = await harness.chat("gpt-4o")
    assert response.json()["choices"][0]["message"]["content"] == "hello from renamed in chat"
    assert harness.container("chat") == chat
    response = await harness.client.post("/v1/chat/completions", content=b"x" * 2048)
    assert response.status_code == 413


async def test_an_added_model_is_served(harness: Harness) -> None:
    harness.write(models=with_model("extra", aliases=["gpt-x"]))
    answer = await harness.client.post("/reload")
    assert answer.json()["added"] == ["extra"]
    response = await harness.chat("gpt-x")
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "hello from gpt-x in extra"
    assert "extra" in [m["id"] for m in (await harness.client.get("/v1/models")).json()["data"]]
    assert harness.backend.running_models() == {"extra"}  # in no set: it runs alone


async def test_an_invalid_file_is_refused_with_its_key_path_and_the_old_config_serves(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await harness.use("chat")
    before = harness.swapper.config
    harness.write(models=with_model("code", port=70000))
    answer = await harness.client.post("/reload")
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (
        "models.code.port",
        "invalid_config",
        "invalid_request_error",
    )
    assert "models.code.port" in error["message"]
    assert "old one keeps serving" in error["message"]
    assert "reload (POST /reload) refused" in caplog.text
    assert harness.swapper.config is before
    assert (await harness.chat("code")).status_code == 200
    harness.path.write_text("models: [")
    with pytest.raises(ConfigError, match="invalid YAML"):
        await harness.reloader.reload("test")
    assert harness.swapper.config is before
    harness.path.write_text("globalTTL: !!bool maybe\n" + yaml.safe_dump(document()))
    answer = await harness.client.post("/reload")
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "globalTTL"
    assert "not a valid !!bool value" in answer.json()["error"]["message"]
    assert harness.swapper.config is before


async def test_a_tightened_matrix_breaks_up_what_it_forbids_cheapest_first(harness: Harness) -> None:
    await harness.use("chat")
    await harness.use("code")
    held = await harness.swapper.acquire("chat")
    harness.write(matrix={**MATRIX, "evict_costs": {"k": 5}, "sets": {"a": "c", "b": "k"}})
    changes = await harness.reloader.reload("test")
    assert changes.forbidden == ("chat",)  # code costs 5 to lose, chat 1
    assert harness.state("chat") is State.LEAVING
    await held.release()
    await harness.settle()
    assert harness.backend.running_models() == {"code"}
    await harness.use("chat")  # and decisions follow the new matrix
    assert harness.backend.running_models() == {"chat"}


async def test_an_image_rebuilt_under_its_name_is_a_change(harness: Harness) -> None:
    await harness.use("chat")
    harness.backend.rebuild("img")
    changes = await harness.reloader.reload("test")  # the same file
    assert (changes.replaced, changes.unchanged) == (("chat",), ("code", "big"))
    await harness.settle()
    assert harness.backend.running_models() == set()


async def test_what_a_running_proxy_cannot_change_keeps_its_old_value(harness: Harness) -> None:
    harness.write(listen="127.0.0.1:9999", apiKeys=["secret-key"], models=with_model("extra"))
    answer = (await harness.client.post("/reload")).json()
    assert answer["needs_restart"] == ["listen", "apiKeys"]
    assert answer["added"] == ["extra"]  # the rest applies
    assert harness.swapper.config.listen == "127.0.0.1:8080"
    assert harness.swapper.config.api_keys == ()
    assert (await harness.client.get("/running")).status_code == 200  # no key needed yet


async def test_reload_is_post_only(harness: Harness) -> None:
    assert (await harness.client.get("/reload")).status_code == 405


async def test_a_change_of_the_env_file_beside_the_config_reloads(harness: Harness) -> None:
    dotenv = harness.path.parent / ".env"
    dotenv.write_text("EXTRA_IMAGE=img:1\n")
    harness.write(models=with_model("extra", image="${EXTRA_IMAGE}"))
    await harness.reloader.reload("test")
    assert harness.swapper.config.models["extra"].image == "img:1"
    async with harness.reloader.serving(watch=True):
        await asyncio.sleep(0.3)  # the watcher has started
        dotenv.write_text("EXTRA_IMAGE=img:2\n")
        await until(lambda: harness.swapper.config.models["extra"].image == "img:2", "the watcher's reload")


async def test_a_change_of_the_file_or_a_sighup_reloads(harness: Harness) -> None:
    async with harness.reloader.serving(watch=True):
        await asyncio.sleep(0.3)  # the watcher has started
        harness.write(models=with_model("watched"))
        await until(lambda: "watched" in harness.swapper.config.models, "the watcher's reload")
    async with harness.reloader.serving(watch=False):
        harness.write(models=with_model("hup"))
        os.kill(os.getpid(), signal.SIGHUP)
        await until(lambda: "hup" in harness.swapper.config.models, "the SIGHUP reload")
    assert "watched" not in harness.swapper.slots  # never started: its slot went with it
