"""Component tests of the sleep tier: a model with vLLM's `sleep` level is put to sleep when
evicted to make room, and woken by its next request, against the fake backend whose `a`
serves vLLM's sleep routes. Outcomes: what runs, what Docker holds, what the client got."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from support import FakeStack

from swapctl.backend.fake import FakeBackend, FakeContainer, FakeModel, echo
from swapctl.config import parse_config
from swapctl.gpus import Device, GpuProcess, MeasuredFootprint, Release, Snapshot, still_held
from swapctl.lifecycle import State, Step, Swapper

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Sleepy:
    """A fake vLLM server with sleep mode, for every container of one model: what of each
    sleeps, how a sleep and a wake answer, and what reached a sleeping or weightless one."""

    asleep: dict[str, set[str]] = field(default_factory=dict)  # container ID -> its parts asleep
    weightless: set[str] = field(default_factory=set)  # level 2 discarded their weights
    sleep_status: int = 200
    wake_status: int = 200
    stays_asleep: bool = False  # a wake answers 200 but GET /is_sleeping keeps saying true
    calls: list[str] = field(default_factory=list)  # the sleep-mode requests, path and query
    served_asleep: list[str] = field(default_factory=list)  # paths forwarded to a sleeping server
    hold: asyncio.Event | None = None  # a wake answers once it is set

    async def __call__(self, request: httpx.Request, box: FakeContainer) -> httpx.Response:
        path, container = request.url.path, box.container.id
        if path in ("/sleep", "/wake_up", "/collective_rpc"):
            self.calls.append(f"{path}?{request.url.query.decode()}".rstrip("?"))
        if path == "/sleep":
            if self.sleep_status == 200:
                self.asleep[container] = {"weights", "kv_cache"}
                if request.url.params.get("level") == "2":
                    self.weightless.add(container)
            return httpx.Response(self.sleep_status)
        if path == "/wake_up":
            if self.hold is not None:
                await self.hold.wait()
            if self.wake_status == 200 and not self.stays_asleep:
                tags = request.url.params.get_list("tags") or ["weights", "kv_cache"]
                self.asleep[container] -= set(tags)
            return httpx.Response(self.wake_status)
        if path == "/collective_rpc":
            self.weightless.discard(container)
            return httpx.Response(200, json={"results": [None]})
        if path == "/is_sleeping":
            return httpx.Response(200, json={"is_sleeping": bool(self.asleep.get(container))})
        if (self.asleep.get(container) or container in self.weightless) and path != "/health":
            self.served_asleep.append(path)
            return httpx.Response(503, json={"error": {"message": "asleep"}})
        return await echo(request, box)

    def sleeping(self) -> set[str]:
        return {c for c, parts in self.asleep.items() if parts}


WAKE_FROM_LEVEL_2 = ["/wake_up?tags=weights", "/collective_rpc", "/wake_up?tags=kv_cache"]


def config(**a: Any) -> dict[str, Any]:
    """Two models the matrix lets run only one at a time; `a` sleeps when evicted."""
    models = {
        "a": {"image": "img", "stop_grace_period": 0, "sleep": 1, **a},
        "b": {"image": "img", "stop_grace_period": 0},
    }
    return {"instance": "test", "models": models, "matrix": {"sets": {"a": "a", "b": "b"}}}


@pytest.fixture
def sleepy() -> Sleepy:
    return Sleepy()


def sleepy_stack(sleepy: Sleepy, **a: Any) -> FakeStack:
    """The fake stack over config(**a), `a` served by `sleepy`."""
    backend = FakeBackend()
    backend.behaviour["a"] = FakeModel(handler=sleepy)
    return FakeStack(config(**a), backend)


@pytest.fixture
async def stack(sleepy: Sleepy) -> AsyncIterator[FakeStack]:
    stack = sleepy_stack(sleepy)
    yield stack
    await stack.close()


async def chat(stack: FakeStack, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return await stack.client.post("/v1/chat/completions", json=body)


def state(swapper: Swapper, model: str) -> State:
    """The model's state, read afresh (so mypy does not narrow it between two reads)."""
    return swapper.slots[model].state


def ids(backend: FakeBackend, model: str) -> list[str]:
    return [b.container.id for b in backend.boxes.values() if b.container.model == model]


async def test_evicted_it_sleeps_and_its_next_request_wakes_the_same_container(
    stack: FakeStack, sleepy: Sleepy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "swapctl")
    assert (await chat(stack, "a")).status_code == 200
    first = ids(stack.backend, "a")
    assert (await chat(stack, "b")).status_code == 200
    assert ids(stack.backend, "a") == first, "put to sleep, its container runs on"
    assert sleepy.sleeping() == set(first) and sleepy.calls == ["/sleep?level=1"]
    assert state(stack.swapper, "a") is State.SLEEPING
    answer = await chat(stack, "a")
    assert answer.status_code == 200 and "in a" in answer.json()["choices"][0]["message"]["content"]
    assert ids(stack.backend, "a") == first, "woken, not created again"
    assert ids(stack.backend, "b") == [], "b was evicted to wake a"
    assert stack.backend.starts == {"a": 1, "b": 1}
    assert sleepy.calls == ["/sleep?level=1", "/wake_up"] and sleepy.served_asleep == []
    assert any(r.getMessage().startswith("wake: a awake in ") for r in caplog.records)
    metrics = stack.swapper.metrics.render().decode()
    assert 'swapctl_model_wake_duration_seconds_count{model="a"} 1.0' in metrics
    assert 'swapctl_model_starts_total{model="a",result="ready"} 1.0' in metrics
    woken = stack.swapper.container("a")
    assert woken is not None
    measured = stack.swapper.measures.get("a", woken.spec_hash)
    assert measured is not None and len(measured.wakes) == 1 and len(measured.starts) == 1


async def test_level_2_wakes_its_weights_reloads_them_then_its_kv_cache(sleepy: Sleepy) -> None:
    stack = sleepy_stack(sleepy, sleep=2)
    try:
        await stack.use("a")
        await stack.use("b")
        assert sleepy.calls == ["/sleep?level=2"]
        assert (await chat(stack, "a")).status_code == 200
        assert sleepy.calls[1:] == WAKE_FROM_LEVEL_2 and sleepy.served_asleep == []
    finally:
        await stack.close()


async def test_a_sleeping_model_counts_as_stopped_for_the_policy(stack: FakeStack) -> None:
    await stack.use("a")
    await stack.use("b")
    assert stack.swapper.running() == ["b"]
    assert stack.swapper.plan("a").evict == ("b",)
    answer = (await stack.client.get("/running")).json()
    assert [row["model"] for row in answer["running"]] == ["b"]  # asleep: not running
    rows = {row["model"]: row for row in answer["models"]}
    assert rows["a"]["state"] == "sleeping" and rows["a"]["container"] is not None
    assert rows["b"]["state"] == "ready"
    metrics = stack.swapper.metrics.render().decode()
    assert 'swapctl_model_state{model="a",state="sleeping"} 1.0' in metrics


async def test_a_sleep_that_fails_stops_the_model(
    stack: FakeStack, sleepy: Sleepy, caplog: pytest.LogCaptureFixture
) -> None:
    sleepy.sleep_status = 500
    await stack.use("a")
    await stack.use("b")
    assert ids(stack.backend, "a") == []
    assert state(stack.swapper, "a") is State.STOPPED
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "a: sleep failed (POST /sleep?level=1 answered HTTP 500); stopping it instead" in warned


async def refused(request: httpx.Request, box: FakeContainer) -> httpx.Response:
    if request.url.path == "/sleep":
        raise httpx.ConnectError("connection refused", request=request)
    return await echo(request, box)


@pytest.mark.parametrize(
    ("handler", "cause"),
    [
        (refused, "POST /sleep?level=1: ConnectError: connection refused"),
        (echo, "it answered POST /sleep but GET /is_sleeping does not say true"),  # no sleep mode
    ],
)
async def test_a_server_that_cannot_sleep_is_stopped(
    stack: FakeStack, caplog: pytest.LogCaptureFixture, handler: Any, cause: str
) -> None:
    stack.backend.behaviour["a"] = FakeModel(handler=handler)
    await stack.use("a")
    await stack.use("b")
    assert ids(stack.backend, "a") == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"a: sleep failed ({cause}); stopping it instead" in warned


async def test_a_wake_that_fails_starts_a_new_container_and_serves_the_request(
    stack: FakeStack, sleepy: Sleepy, caplog: pytest.LogCaptureFixture
) -> None:
    await stack.use("a")
    first = ids(stack.backend, "a")
    await stack.use("b")
    sleepy.wake_status = 500
    answer = await chat(stack, "a")
    assert answer.status_code == 200
    assert ids(stack.backend, "a") not in ([], first), "a new container"
    assert stack.backend.starts["a"] == 2 and sleepy.served_asleep == []
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "a: wake failed (POST /wake_up answered HTTP 500); stopping its container and starting a new one"
        in warned
    )


async def test_a_server_that_stays_asleep_is_replaced_after_its_health_check_timeout(
    sleepy: Sleepy, caplog: pytest.LogCaptureFixture
) -> None:
    stack = sleepy_stack(sleepy, healthCheckTimeout=1)
    try:
        await stack.use("a")
        await stack.use("b")
        sleepy.stays_asleep = True
        assert (await chat(stack, "a")).status_code == 200
        assert stack.backend.starts["a"] == 2 and sleepy.served_asleep == []
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert (
            "a: wake failed (GET /is_sleeping still not false after 1s); stopping its container and starting a new one"
            in warned
        )
    finally:
        await stack.close()


async def test_unload_removes_a_sleeping_container(stack: FakeStack) -> None:
    await stack.use("a")
    await stack.use("b")
    assert await stack.swapper.unload("a") == ["a"]
    assert ids(stack.backend, "a") == []
    assert state(stack.swapper, "a") is State.STOPPED
    await stack.use("a")  # a cold start now
    assert stack.backend.starts["a"] == 2


async def test_a_reload_that_changes_a_sleeping_model_removes_its_container(stack: FakeStack) -> None:
    await stack.use("a")
    await stack.use("b")
    changes = await stack.swapper.reload(parse_config(config(command=["--new"])))
    assert changes.replaced == ("a",)
    for _ in range(100):
        if not ids(stack.backend, "a"):
            break
        await asyncio.sleep(0.01)
    assert ids(stack.backend, "a") == []
    assert state(stack.swapper, "a") is State.STOPPED


async def test_a_crashed_sleeping_container_is_noticed(stack: FakeStack) -> None:
    await stack.use("a")
    await stack.use("b")
    stack.backend.crash("a")
    await stack.swapper.check()
    assert state(stack.swapper, "a") is State.STOPPED
    assert ids(stack.backend, "a") == []


async def test_a_sleeping_container_past_its_ttl_is_removed(sleepy: Sleepy) -> None:
    now = [1000.0]
    backend = FakeBackend()
    backend.behaviour["a"] = FakeModel(handler=sleepy)
    async with httpx.AsyncClient(transport=backend.transport) as client:
        swapper = Swapper(parse_config(config(ttl=60)), backend, client, clock=lambda: now[0])
        await (await swapper.acquire("a")).release()
        await (await swapper.acquire("b")).release()
        assert state(swapper, "a") is State.SLEEPING
        await swapper.check()
        assert ids(backend, "a") != [], "not idle long enough"
        now[0] += 61
        await swapper.check()
        assert ids(backend, "a") == [] and state(swapper, "a") is State.STOPPED
        await swapper.unload()


async def test_up_adopts_a_sleeping_container_as_sleeping(sleepy: Sleepy) -> None:
    backend = FakeBackend()
    backend.behaviour["a"] = FakeModel(handler=sleepy)
    async with httpx.AsyncClient(transport=backend.transport) as client:
        before = Swapper(parse_config(config()), backend, client)
        await (await before.acquire("a")).release()
        await (await before.acquire("b")).release()  # a sleeps; then `up` exits, keeping both
        asleep = ids(backend, "a")
        after = Swapper(parse_config(config()), backend, client)
        assert await after.adopt() == ["b"]
        assert state(after, "a") is State.SLEEPING and after.running() == ["b"]
        assert after.container("a") is not None and [after.container("a").id] == asleep  # type: ignore[union-attr]
        await (await after.acquire("a")).release()
        assert ids(backend, "a") == asleep and ids(backend, "b") == []
        assert sleepy.calls[-3:] == WAKE_FROM_LEVEL_2, "its level unknown: woken as from level 2"
        assert backend.starts["a"] == 1 and sleepy.served_asleep == []
        await after.unload()


def test_a_sleeping_server_s_memory_counts_as_back_though_its_process_stays() -> None:
    """Verified eviction of a model put to sleep looks at the memory only."""
    container = "c" * 64
    footprint = MeasuredFootprint(container, ((0, 10_000),), frozenset({7}))
    process = GpuProcess(7, 500)
    after = Snapshot((Device(0, "u", "gpu", 100_000, 1_000, (process,)),))
    asleep = Release(footprint, ((0, 11_000),), ((0, frozenset({7})),), asleep=True)
    stopped = Release(footprint, ((0, 11_000),), ((0, frozenset({7})),))
    assert still_held(asleep, after, lambda pid: None) == ()
    assert still_held(stopped, after, lambda pid: None) == (0,)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/upstream/a/sleep?level=1"),
        ("POST", "/upstream/a//wake_up"),
        ("GET", "/upstream/a/is_sleeping/"),
        ("POST", "/upstream/a/./collective_rpc"),
        ("POST", "/sleep?model=a&level=1"),
    ],
)
async def test_the_sleep_routes_of_a_sleep_model_are_not_passed_on(
    stack: FakeStack, sleepy: Sleepy, method: str, path: str
) -> None:
    await stack.use("a")
    answer = await stack.client.request(method, path)
    assert answer.status_code == 403
    assert "is swapctl's own (it puts this model to sleep and wakes it)" in answer.json()["error"]["message"]
    assert sleepy.calls == [] and state(stack.swapper, "a") is State.READY


async def test_a_model_without_sleep_keeps_its_own_routes(stack: FakeStack) -> None:
    answer = await stack.client.post("/upstream/b/sleep?level=1", content=b"x")
    assert answer.status_code == 200 and answer.json()["path"] == "/sleep"


async def test_a_wake_under_way_is_told_as_waking_with_the_last_wakes_as_estimate(
    stack: FakeStack, sleepy: Sleepy
) -> None:
    await chat(stack, "a")
    await chat(stack, "b")
    [container] = ids(stack.backend, "a")
    spec_hash = stack.backend.boxes[container].container.spec_hash
    stack.swapper.measures.record_wake("a", spec_hash, 2.5)
    sleepy.hold = asyncio.Event()
    waking = asyncio.create_task(chat(stack, "a"))
    while (progress := stack.swapper.progress("a")) is None or progress.step is not Step.WAKING:
        await asyncio.sleep(0.01)
    assert progress.waking and progress.last_starts == (2.5,)
    sleepy.hold.set()
    assert (await waking).status_code == 200


async def test_in_fit_mode_a_failed_wake_starts_the_new_container_where_the_decision_placed_it(
    sleepy: Sleepy,
) -> None:
    """a slept on GPU 1 and its wake is decided there (a sleeping container keeps its GPUs).
    Its wake fails: the new container goes where the decision placed it, GPU 1, though GPU 0
    is freer by then."""
    gpu = {"gpus": 1, "stop_grace_period": 0, "image": "img"}
    raw = {
        "instance": "test",
        "models": {
            "p": {**gpu, "gpus": ["0"], "vram": "10GiB"},
            "q": {**gpu, "gpus": ["1"], "vram": "8GiB"},
            "a": {**gpu, "vram": "12GiB", "sleep": 1},
            "b": {**gpu, "vram": "24GiB"},
        },
        "matrix": {"fit": "gpu"},
        "hardware": {"gpus": [{"memory": "24GiB"}] * 2},
    }
    backend = FakeBackend(gpus=True)
    backend.behaviour["a"] = FakeModel(handler=sleepy)
    stack = FakeStack(raw, backend)

    def devices(model: str) -> object:
        [box] = [b for b in backend.boxes.values() if b.container.model == model and b.container.running]
        return box.spec.gpus

    try:
        await stack.use("p")
        await stack.use("a")
        assert devices("a") == ("1",)
        await stack.use("b")  # the whole of GPU 1: a sleeps
        assert state(stack.swapper, "a") is State.SLEEPING
        await stack.swapper.unload("b")
        await stack.swapper.unload("p")
        await stack.use("q")  # GPU 0: 24 GiB free, GPU 1: 16 GiB
        sleepy.wake_status = 500
        assert (await chat(stack, "a")).status_code == 200
        assert backend.starts["a"] == 2
        assert devices("a") == ("1",)
    finally:
        await stack.close()
