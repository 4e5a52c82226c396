"""Images pulled as each model's pull_policy says, over the fake backend and its registry:
when absent (missing), before every start (always), never (an absent image is an error);
a pull's progress in the loading feedback and the log; a failed pull named, with the
registry's answer, losing nothing that runs; the pull before the decision, so that nothing
is evicted for a pull that fails; `swapctl pull`."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import config_file, run_cli

from swapctl.backend import Container
from swapctl.backend.fake import FakeBackend, FakeImage, FakeModel
from swapctl.config import parse_config
from swapctl.errors import ImageMissing, PullFailed
from swapctl.lifecycle import State, Step, Swapper
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream
from swapctl.spec import ContainerSpec

pytestmark = pytest.mark.anyio
TICK = 0.02
IMAGE = "registry.test:5000/team/chat:1"
PRESENT = "present:1"
TOGETHER = {"all": "new & old & here & told"}
APART = {"pulled": "new & told", "present": "old & here"}  # a model of one set evicts the other's


class Watched(FakeBackend):
    """A fake engine that keeps each set of models its containers ran together."""

    def __init__(self, images: set[str]) -> None:
        super().__init__(images=images)
        self.together: list[frozenset[str]] = []

    def start(self, spec: ContainerSpec) -> Container:
        container = super().start(spec)
        self.together.append(frozenset(self.running_models()))
        return container

    def apart(self) -> bool:
        """Whether no two models of APART's two sets ever ran together."""
        return not any(ran & {"new", "told"} and ran & {"old", "here"} for ran in self.together)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class World:
    """The swapper and the app over a fake engine that holds PRESENT, and a registry that
    holds IMAGE; `policy` is the pull_policy of the model `new`, whose image is IMAGE, and
    `sets` the matrix's sets."""

    def __init__(self, policy: str = "missing", sets: dict[str, str] = TOGETHER, **new: Any) -> None:
        self.backend = Watched(images={PRESENT})
        self.backend.registry[IMAGE] = FakeImage(layers=(3_000_000, 1_000_000))
        self.backend.registry[PRESENT] = FakeImage()
        models = {
            "new": {"image": IMAGE, "pull_policy": policy, **new},
            "old": {"image": PRESENT, "pull_policy": policy},
            "here": {"image": PRESENT},
            "told": {"image": IMAGE, "sendLoadingState": True},
        }
        matrix = {"sets": sets}
        self.upstream = httpx.AsyncClient(transport=self.backend.transport)
        self.swapper = Swapper(
            parse_config({"instance": "t", "models": models, "matrix": matrix}), self.backend, self.upstream
        )
        app = build_app(
            self.swapper.config, self.swapper, HttpxUpstream(self.upstream), self.swapper.metrics, tick=TICK
        )
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1")

    async def use(self, model: str) -> None:
        await (await self.swapper.acquire(model)).release()

    async def chat(self, model: str, stream: bool = False) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
        return await self.client.post("/v1/chat/completions", json=body)

    async def close(self) -> None:
        await self.swapper.unload()
        await self.client.aclose()
        await self.upstream.aclose()


@pytest.fixture
async def world() -> AsyncIterator[World]:
    found = World()
    yield found
    await found.close()


async def test_missing_pulls_an_absent_image_once_then_starts_it(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "swapctl")
    assert await world.swapper.backend.image_id(IMAGE) is None
    await world.use("new")
    await world.swapper.unload("new")
    await world.use("new")
    await world.use("here")
    assert world.backend.pulls == [IMAGE]  # present since: not pulled again; PRESENT never
    assert world.backend.starts == {"new": 2, "here": 1}
    log = [r.getMessage() for r in caplog.records]
    assert f"pulling image {IMAGE} for new" in log
    pulled = [line for line in log if line.startswith(f"pulled image {IMAGE} in ")]
    assert len(pulled) == 1 and pulled[0].endswith("s (4.0 MB downloaded)")
    assert log.index(f"pulling image {IMAGE} for new") < log.index(f"starting new ({IMAGE})")


async def test_always_pulls_before_every_start() -> None:
    world = World("always")
    try:
        await world.use("old")
        await world.swapper.unload("old")
        await world.use("old")
        assert world.backend.pulls == [PRESENT, PRESENT]
        assert world.backend.starts == {"old": 2}
    finally:
        await world.close()


async def test_never_starts_a_present_image_and_refuses_an_absent_one() -> None:
    world = World("never")
    try:
        await world.use("old")
        with pytest.raises(ImageMissing) as raised:
            await world.use("new")
        message = str(raised.value)
        assert message.startswith(f"model 'new': image '{IMAGE}' is not on this machine")
        assert "pull_policy is never" in message and "swapctl pull new" in message
        assert world.backend.pulls == []
        assert world.swapper.slots["new"].state is State.STOPPED
        answer = await world.chat("new")
        assert answer.status_code == 503
        assert answer.json()["error"]["message"] == message
    finally:
        await world.close()


async def test_a_failed_pull_names_the_image_and_the_registry_and_loses_nothing(world: World) -> None:
    refusal = "unauthorized: authentication required"
    world.backend.registry[IMAGE] = FakeImage(refusal=refusal)
    await world.use("here")  # already running, in the same set: nothing needs to stop
    answer = await world.chat("new")
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["message"] == f"model 'new': cannot pull image '{IMAGE}': {refusal}"
    assert error["code"] == "backend_error"
    assert world.swapper.slots["new"].state is State.STOPPED
    assert world.backend.running_models() == {"here"}  # what ran still runs, and serves
    assert (await world.chat("here")).status_code == 200
    with pytest.raises(PullFailed, match="model 'new': cannot pull image"):
        await world.use("new")  # tried again on the next request, as a start is
    assert world.backend.pulls == [IMAGE, IMAGE]
    world.backend.registry[IMAGE] = FakeImage()  # the registry has it now
    assert (await world.chat("new")).status_code == 200


async def test_an_image_the_registry_lacks(world: World) -> None:
    del world.backend.registry[IMAGE]
    answer = await world.chat("new")
    message = answer.json()["error"]["message"]
    assert (
        message
        == f"model 'new': cannot pull image '{IMAGE}': manifest for {IMAGE} not found: manifest unknown"
    )


@pytest.fixture
def hold() -> Iterator[threading.Event]:
    """Holds the fake's pulls halfway through their first layer until set (at the end)."""
    event = threading.Event()
    yield event
    event.set()


async def pulling(world: World, model: str) -> None:
    """Until the model's start has pulled its first bytes."""
    for _ in range(500):
        progress = world.swapper.progress(model)
        if progress is not None and progress.pulled is not None and progress.pulled.done:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the pull never began")


async def test_a_pull_shows_in_the_loading_comments(world: World, hold: threading.Event) -> None:
    world.backend.registry[IMAGE] = FakeImage(layers=(3_000_000, 1_000_000), hold=hold)
    request = asyncio.create_task(world.chat("new", stream=True))
    await pulling(world, "new")
    progress = world.swapper.progress("new")
    assert progress is not None and progress.step is Step.PULLING
    assert progress.pulled is not None
    assert (progress.pulled.image, progress.pulled.done, progress.pulled.total) == (
        IMAGE,
        1_500_000,
        3_000_000,
    )
    await asyncio.sleep(TICK * 3)
    hold.set()
    answer = await request
    comments = [line for line in answer.text.split("\n") if line.startswith(":")]
    assert all(c.startswith(": loading new ") for c in comments)
    assert any(c.endswith(f"s, pulling image {IMAGE}: 1.5/3.0 MB") for c in comments)
    assert answer.text.rstrip().endswith("data: [DONE]")  # then the model's answer


async def test_a_pull_shows_in_the_reasoning_of_a_chat(world: World, hold: threading.Event) -> None:
    world.backend.registry[IMAGE] = FakeImage(layers=(3_000_000, 1_000_000), hold=hold)
    world.backend.behaviour["told"] = FakeModel(ready_after=0.2)  # its steps last a few notes
    request = asyncio.create_task(world.chat("told", stream=True))
    await pulling(world, "told")
    await asyncio.sleep(TICK * 3)
    hold.set()
    answer = await request
    events = [json.loads(line[6:]) for line in answer.text.split("\n") if line.startswith("data: {")]
    reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in events)
    assert f"\nPulling image {IMAGE}… 1.5/3.0 MB" in reasoning
    assert "Starting its container" in reasoning
    assert reasoning.index("Pulling image") < reasoning.index("Starting its container")


async def test_a_start_that_pulls_nothing_says_nothing_of_pulling(world: World) -> None:
    world.backend.behaviour["here"] = FakeModel(ready_after=0.1)
    answer = await world.chat("here", stream=True)
    assert "pulling" not in answer.text.lower()


async def test_the_health_timeout_does_not_count_the_pull(hold: threading.Event) -> None:
    """A pull longer than healthCheckTimeout, then a server that answers at once: ready."""
    world = World(healthCheckTimeout=1)
    world.backend.registry[IMAGE] = FakeImage(hold=hold)
    try:
        started = asyncio.create_task(world.use("new"))
        await pulling(world, "new")
        await asyncio.sleep(1.3)
        hold.set()
        await asyncio.wait_for(started, 10)
        assert world.swapper.slots["new"].state is State.READY
    finally:
        await world.close()


# --- the pull before the decision -------------------------------------------------------------


async def until(world: World, done: Callable[[], bool]) -> None:
    """Until a change of the swapper's state makes `done` true."""
    changed = world.swapper.changed
    async with changed:
        await asyncio.wait_for(changed.wait_for(done), 10)  # 10 s: only so that a hang fails


@pytest.mark.parametrize("policy", ["missing", "always", "never"])
async def test_a_start_whose_image_fails_evicts_nothing_in_its_way(policy: str) -> None:
    """`new` would evict `here`, but its image cannot be had: `here` never stops, and serves."""
    world = World(policy, APART)
    world.backend.registry[IMAGE] = FakeImage(refusal="unauthorized: authentication required")
    try:
        await world.use("here")
        answer = await world.chat("new")
        assert answer.status_code == 503
        assert f"image '{IMAGE}'" in answer.json()["error"]["message"]
        assert world.swapper.slots["here"].state is State.READY
        assert world.backend.starts == {"here": 1}  # never stopped, so never started again
        assert (await world.chat("here")).status_code == 200
        swap = world.swapper.activity.history()[-1]
        assert (swap["model"], swap["evicted"], swap["ok"]) == ("new", [], False)
    finally:
        await world.close()


async def test_a_pull_comes_before_the_decision_and_its_evictions(hold: threading.Event) -> None:
    world = World(sets=APART)
    world.backend.registry[IMAGE] = FakeImage(layers=(3_000_000, 1_000_000), hold=hold)
    world.backend.behaviour["told"] = FakeModel(ready_after=0.2)  # its steps last a few notes
    try:
        await world.use("here")
        async with await world.swapper.acquire("here") as held:  # in flight: its eviction waits
            with world.swapper.activity.subscribe({"model"}) as subscription:
                request = asyncio.create_task(world.chat("told", stream=True))
                await pulling(world, "told")
                progress = world.swapper.progress("told")
                assert progress is not None and (progress.step, progress.evicting) == (Step.PULLING, ())
                assert world.swapper.slots["here"].state is State.READY  # not leaving: it serves
                assert (await world.chat("here")).status_code == 200
                hold.set()
                await until(world, lambda: world.swapper.slots["here"].state is State.LEAVING)
                progress = world.swapper.progress("told")
                assert progress is not None
                assert (progress.step, progress.evicting) == (Step.EVICTING, ("here",))
                await held.release()
                answer = await request
                subscription.end()
                rows = [(event.data["model"], event.data["state"]) async for event in subscription]
        assert rows.index(("told", "starting")) < rows.index(("here", "leaving"))
        assert world.backend.running_models() == {"told"}
        events = [json.loads(line[6:]) for line in answer.text.split("\n") if line.startswith("data: {")]
        reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in events)
        lines = [f"Pulling image {IMAGE}…", "Stopping here to make room…", "Starting its container…"]
        assert all(line in reasoning for line in lines)
        assert sorted(lines, key=reasoning.index) == lines
        assert world.backend.apart()
    finally:
        hold.set()
        await world.close()


async def test_requests_during_a_pull_share_it(world: World, hold: threading.Event) -> None:
    world.backend.registry[IMAGE] = FakeImage(hold=hold)
    first = await world.swapper.admit("new")
    await pulling(world, "new")
    second = await world.swapper.admit("new")
    assert not second.ready  # it joins the start under way
    hold.set()
    for lease in await asyncio.gather(first.lease(), second.lease()):
        await lease.release()
    assert world.backend.pulls == [IMAGE]
    assert world.backend.starts == {"new": 1}


async def test_a_model_in_the_way_asked_for_during_a_pull_does_not_end_it(hold: threading.Event) -> None:
    """`here`, asked for while `new` pulls, is decided without `new` (a pull holds nothing)
    and starts; once its image is here, `new` is decided and evicts `here` when its request
    is over. Both requests are served: another request's decision never fails a waiting one."""
    world = World(sets=APART)
    world.backend.registry[IMAGE] = FakeImage(hold=hold)
    try:
        new = asyncio.create_task(world.chat("new"))
        await pulling(world, "new")
        assert world.swapper.slots["new"].state is State.PULLING
        served_first = await world.chat("here")  # not held up by the pull
        assert served_first.status_code == 200
        assert not world.swapper.slots["new"].leaving
        hold.set()
        answer = await new
        assert answer.status_code == 200, answer.text
        assert world.backend.running_models() == {"new"}
        assert world.backend.pulls == [IMAGE]
        assert world.backend.apart()
    finally:
        hold.set()
        await world.close()


async def test_an_image_removed_since_it_was_seen_is_pulled_when_its_start_finds_it_gone(
    world: World,
) -> None:
    await world.use("new")
    await world.swapper.unload("new")
    assert world.backend.images is not None
    world.backend.images.discard(IMAGE)  # removed behind swapctl's back (docker image prune)
    await world.use("new")
    assert world.backend.pulls == [IMAGE, IMAGE]
    assert world.backend.starts == {"new": 2}


# --- swapctl pull ----------------------------------------------------------------------------

CONFIG = f"""
instance: pull-test
models:
  a: {{image: "{IMAGE}", aliases: [alpha]}}
  b: {{image: "{IMAGE}"}}
  c: {{image: "{PRESENT}", pull_policy: never}}
  d: {{image: "elsewhere/d:1"}}
"""


def run(
    capsys: pytest.CaptureFixture[str], backend: FakeBackend, path: Path, *argv: str
) -> tuple[int, str, str]:
    return run_cli(capsys, lambda: backend, "pull", *argv, "-c", str(path))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return config_file(tmp_path, CONFIG)


def test_swapctl_pull_pulls_each_image_once_with_bars(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    backend = FakeBackend(images=set())
    backend.registry[IMAGE] = FakeImage(layers=(3_000_000, 12_000_000))
    code, out, err = run(capsys, backend, config, "alpha", "b", "a")
    assert (code, err) == (0, "")
    assert backend.pulls == [IMAGE]  # a and b share it: one pull
    assert f"pulling image {IMAGE} (a, b)" in out
    assert "layer0" in out and "3.0/3.0 MB" in out and "12.0/12.0 MB" in out and "Pull complete" in out
    assert f"pulled image {IMAGE} in " in out and "(15 MB downloaded)" in out
    assert backend.image_id(IMAGE) is not None


def test_swapctl_pull_of_every_model_skips_never_and_names_each_failure(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    backend = FakeBackend(images=set())
    backend.registry[IMAGE] = FakeImage(refusal="denied: requested access to the resource is denied")
    code, out, err = run(capsys, backend, config)
    assert code == 1
    assert backend.pulls == [IMAGE, "elsewhere/d:1"]  # c's pull_policy is never
    assert err.splitlines() == [
        f"error: model 'a': cannot pull image '{IMAGE}': denied: requested access to the resource is denied",
        f"error: model 'b': cannot pull image '{IMAGE}': denied: requested access to the resource is denied",
        "error: model 'd': cannot pull image 'elsewhere/d:1': manifest for elsewhere/d:1 not found: "
        "manifest unknown",
    ]
    assert "Traceback" not in out + err


def test_swapctl_pull_of_a_never_model_named_pulls_it(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    backend = FakeBackend(images=set())
    backend.registry[PRESENT] = FakeImage()
    assert run(capsys, backend, config, "c")[0] == 0
    assert backend.pulls == [PRESENT]


def test_swapctl_pull_of_an_unknown_model_exits_2(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    backend = FakeBackend(images=set())
    code, _, err = run(capsys, backend, config, "a", "zz")
    assert code == 2
    assert err == "error: unknown model 'zz' (configured: a, b, c, d)\n"
    assert backend.pulls == []  # nothing pulled before the mistake was found
