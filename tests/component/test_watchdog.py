"""The watchdog: a model stuck in a transitional state past the deadline its config sets, or
with no task moving it, is repaired: its waiters are answered with a 503 that names the
cause, the slot rests, the repair is counted, and /health says degraded for a while.
And the upkeep's other level-triggered check added with it: a server that fell asleep."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from gated import GatedWorld
from support import Clock

from swapctl.config import Config, parse_config
from swapctl.errors import Overdue, SwapctlError
from swapctl.lifecycle import State, Swapper
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def config(**model: object) -> Config:
    spec = {"image": "img", "stop_grace_period": 1, "healthCheckTimeout": 30, **model}
    return parse_config({"instance": "test", "models": {"a": spec, "b": dict(spec)}})


def state(swapper: Swapper, model: str) -> State:
    """Read afresh, so that mypy does not narrow it between two reads."""
    return swapper.slots[model].state


async def outcome(swapper: Swapper, model: str) -> str:
    try:
        await (await swapper.acquire(model)).release()
    except SwapctlError as error:
        return f"{type(error).__name__}: {error}"
    return "served"


async def test_a_start_held_past_its_deadline_is_ended_and_its_waiters_told_why() -> None:
    clock = Clock(frozen=True)
    world = GatedWorld(config(), held=("start",), clock=clock)
    world.swapper.images.add("img")
    try:
        waiting = asyncio.create_task(outcome(world.swapper, "a"))
        await world.waiting("start", "a")  # the engine never answers
        await world.swapper.check()
        assert state(world.swapper, "a") is State.STARTING  # within its deadline: left alone
        clock.now += 30 + 1 + 60 + 1  # health check timeout, stop grace, margin
        await world.swapper.check()
        answer = await asyncio.wait_for(waiting, 5)
        assert answer.startswith("Overdue: model 'a': stuck starting (starting): past its deadline (91s)")
        assert world.swapper.degraded() == [answer.removeprefix("Overdue: ")]
        scraped = world.swapper.metrics.render().decode()
        assert 'swapctl_watchdog_repairs_total{model="a",state="starting"} 1.0' in scraped
        assert state(world.swapper, "a") is State.STARTING  # counted until the engine answers
        world.gates.free()  # it does: the container it created is removed
        await world.settle()
        assert state(world.swapper, "a") is State.STOPPED
        assert world.fake.running_models() == set()
        assert await outcome(world.swapper, "a") == "served"  # nothing hangs: the next request starts it
        clock.now += 301
        assert world.swapper.degraded() == []
    finally:
        await world.close()


async def test_a_transitional_state_with_no_live_owner_is_repaired_at_once() -> None:
    world = GatedWorld(config(), held=("health",))
    world.swapper.images.add("img")
    try:
        waiting = asyncio.create_task(outcome(world.swapper, "a"))
        await world.waiting("health", "a")
        slot = world.swapper.slots["a"]
        owner = slot.owner
        assert owner is not None and not owner.done()
        dead: asyncio.Task[None] = asyncio.create_task(asyncio.sleep(0))
        await dead
        slot.owner = dead  # as if its task had ended without moving it on: a bug the watchdog catches
        await world.swapper.check()
        answer = await asyncio.wait_for(waiting, 5)
        assert "stuck starting (loading): no task moves it" in answer
        assert slot.state in (State.STOPPED, State.STOP_FAILED)
        owner.cancel()
    finally:
        await world.close()


async def test_health_says_degraded_while_a_repair_is_recent() -> None:
    clock = Clock(frozen=True)
    world = GatedWorld(config(), held=("start",), clock=clock)
    world.swapper.images.add("img")
    app = build_app(world.swapper.config, world.swapper, HttpxUpstream(world.client), world.swapper.metrics)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1"
        ) as http:
            assert (await http.get("/health")).text == "OK"
            waiting = asyncio.create_task(outcome(world.swapper, "a"))
            await world.waiting("start", "a")
            clock.now += 1000
            await world.swapper.check()
            await waiting
            health = await http.get("/health")
            assert health.status_code == 200
            assert health.text.startswith("degraded: model 'a': stuck starting")
    finally:
        await world.close()


async def test_a_ready_sleep_model_whose_server_sleeps_counts_as_asleep_and_is_woken() -> None:
    """`up` killed while it put a model to sleep: adopted awake, the sleep ends afterwards;
    the upkeep sees it asleep and the next request wakes it instead of getting its 503s."""
    world = GatedWorld(config(sleep=1), held=())
    try:
        assert await outcome(world.swapper, "a") == "served"
        container = world.swapper.slots["a"].container
        assert container is not None
        world.server.sleeping.add(container.id)  # the sleep asked before the kill has ended
        await world.swapper.check()
        assert state(world.swapper, "a") is State.SLEEPING
        assert await outcome(world.swapper, "a") == "served"
        assert state(world.swapper, "a") is State.READY
        assert world.swapper.slots["a"].container == container  # woken, not started anew
        assert container.id not in world.server.sleeping
    finally:
        await world.close()


def test_overdue_is_a_backend_error_so_the_proxy_answers_503() -> None:
    from swapctl.proxy.errors import error_response

    response = error_response(Overdue("stuck starting: past its deadline", "a"))
    assert response.status_code == 503
