"""The lifecycle's promises, each in the situation that once broke it.

1. A request waiting for its model is served unless that model's own start fails.
2. Every admitted request ends, with an answer; nothing waits on a wait that cannot end.
3. The matrix holds at every instant.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import httpx
import pytest
from gated import GatedWorld

from swapctl.backend.fake import FakeBackend, FakeModel
from swapctl.config import Config, parse_config
from swapctl.errors import SwapctlError
from swapctl.lifecycle import State, Swapper, Ticket
from swapctl.matrix import allowed_part

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def one_at_a_time(*models: str, **top: Any) -> Config:
    """A config of `models` on one image, with no matrix: one model runs at a time."""
    spec = {"image": "img", "stop_grace_period": 0, "healthCheckTimeout": 30, "concurrencyLimit": 64}
    return parse_config({"instance": "test", "models": dict.fromkeys(models, spec), **top})


def phase(swapper: Swapper, model: str) -> State:
    """The model's phase, read afresh (so mypy does not narrow it between two reads)."""
    return swapper.slots[model].phase


async def served(swapper: Swapper, ticket: Ticket) -> str:
    """What became of an admitted request: `served`, or its error."""
    try:
        lease = await ticket.lease()
    except SwapctlError as error:
        return str(error)
    await lease.release()
    return "served"


async def test_a_start_that_fails_while_evicted_does_not_wedge_the_swaps_after_it() -> None:
    """The circular wait a storm found, step by step: `c` once waited for `a` to stop while
    `a` waited for `c`, and every later request waited behind them."""
    world = GatedWorld(one_at_a_time("a", "b", "c"), held=("start",))
    world.swapper.images.add("img")  # no image check: the wedge needs none
    try:
        first_a = await world.swapper.admit("a")  # (1) `a` starts, a request holding it
        await world.waiting("start", "a")
        b = asyncio.create_task(served(world.swapper, await world.swapper.admit("b")))  # (2) evicts `a`
        await world.settle()
        assert world.swapper.slots["a"].leaving
        world.gates.open("start", "a", ok=False)  # (3) `a`'s start fails while it leaves
        await world.settle()
        assert phase(world.swapper, "a") is State.STOPPED
        c = asyncio.create_task(served(world.swapper, await world.swapper.admit("c")))  # (4) evicts `b`
        await world.settle()
        await first_a.release()  # (5) `a`'s request lets go; `a` is asked for again
        again_a = asyncio.create_task(served(world.swapper, await world.swapper.admit("a")))
        await world.settle()
        world.gates.free()  # (6) everything outside answers from now on
        async with asyncio.timeout(10):
            answers = await asyncio.gather(b, c, again_a)
        assert list(answers) == ["served", "served", "served"]
        assert world.fake.running_models() == {"a"}
    finally:
        await world.close()


async def test_a_request_waiting_for_its_image_is_not_failed_by_another_decision() -> None:
    """`a` checks its image (as every first start of a fresh `up` does) while a request for
    `b` is decided: `b`'s decision does not end `a`'s start; both requests are served."""
    world = GatedWorld(one_at_a_time("a", "b"), held=("image",))
    try:
        a = asyncio.create_task(served(world.swapper, await world.swapper.admit("a")))
        await world.waiting("image", "img")
        b = asyncio.create_task(served(world.swapper, await world.swapper.admit("b")))
        await world.settle()
        world.gates.free()
        async with asyncio.timeout(10):
            assert list(await asyncio.gather(a, b)) == ["served", "served"]
        assert len(world.fake.running_models()) == 1
    finally:
        await world.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_storm_on_a_fresh_swapper_loses_nothing(seed: int) -> None:
    """16 clients over 5 models that run one at a time, from the first instant of a fresh
    swapper (no image seen yet), on the fake engine with threads as in production: every
    request is served, none waits forever, and no two models ever run together."""
    models = tuple(f"m-{x}" for x in "abcde")
    fake = FakeBackend()
    rng = random.Random(seed)
    for model in models:
        fake.behaviour[model] = FakeModel(ready_after=rng.choice((0.0, 0.01, 0.03)))
    async with httpx.AsyncClient(transport=fake.transport) as client:
        swapper = Swapper(one_at_a_time(*models), fake, client)
        outcomes: Counter[str] = Counter()
        seen: set[frozenset[str]] = set()

        async def sample() -> None:
            while True:
                seen.add(frozenset(fake.running_models()))
                await asyncio.sleep(0.002)

        async def client_task(number: int) -> None:
            own = random.Random(seed * 100 + number)
            for _ in range(12):
                model = own.choice(models)
                try:
                    lease = await swapper.acquire(model)
                except SwapctlError as error:
                    outcomes[str(error)] += 1
                    continue
                await asyncio.sleep(own.choice((0.0, 0.001, 0.005)))
                await lease.release()
                outcomes["served"] += 1

        sampler = asyncio.create_task(sample())
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(client_task(n) for n in range(16)))
        finally:
            sampler.cancel()
            await swapper.unload()
        assert outcomes == Counter({"served": 16 * 12})
        assert all(len(running) <= 1 for running in seen)
        policy = swapper.policy()
        assert all(set(allowed_part(policy, sorted(r))) == r for r in seen)
