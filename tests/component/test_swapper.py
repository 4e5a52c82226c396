"""Component tests: the swapper against the fake backend. Outcomes, not call shapes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from support import Clock, Swappers, swappers_fixture

from swapctl.backend.fake import FakeBackend, FakeContainer, FakeModel
from swapctl.config import Config, parse_config
from swapctl.errors import GpuUnavailable, ImageMissing, PullFailed, StartError
from swapctl.lifecycle import State, Swapper
from swapctl.matrix import allowed_part
from swapctl.spec import build_spec

MATRIX = {
    "vars": {"c": "chat", "k": "code", "B": "big"},
    "evict_costs": {"B": 10},
    "sets": {"pair": "c & k", "alone": "B"},
}


def make_config(**extra: Any) -> Config:
    models = {name: {"image": "img", "stop_grace_period": 0} for name in ("chat", "code", "big")}
    models.update(extra.pop("models", {}))
    return parse_config({"models": models, "matrix": MATRIX, "instance": "test", **extra})


Run = Callable[[Config], Awaitable[tuple[Swapper, FakeBackend]]]


swapper_for = swappers_fixture()


pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def state(swapper: Swapper, model: str) -> State:
    """The model's state, read afresh (so mypy does not narrow it between two reads)."""
    return swapper.slots[model].state


async def use(swapper: Swapper, model: str) -> None:
    await (await swapper.acquire(model)).release()


async def test_the_matrix_decides_what_runs(swapper_for: Swappers) -> None:
    backend = FakeBackend()
    swapper = swapper_for(make_config(), backend)
    await use(swapper, "chat")
    await use(swapper, "code")
    assert backend.running_models() == {"chat", "code"}
    await use(swapper, "big")
    assert backend.running_models() == {"big"}
    await use(swapper, "chat")
    assert backend.running_models() == {"chat"}
    assert swapper.running() == ["chat"]


async def test_concurrent_requests_join_one_start(swapper_for: Swappers) -> None:
    backend = FakeBackend()
    backend.behaviour["chat"] = FakeModel(ready_after=0.1)
    swapper = swapper_for(make_config(), backend)
    await asyncio.gather(*(use(swapper, "chat") for _ in range(10)))
    assert backend.starts == {"chat": 1}
    assert swapper.slots["chat"].in_flight == 0


async def test_a_busy_model_is_not_evicted_until_its_requests_finish(
    swapper_for: Swappers,
) -> None:
    backend = FakeBackend()
    swapper = swapper_for(make_config(), backend)
    busy = await swapper.acquire("chat")
    wanted = asyncio.create_task(use(swapper, "big"))
    await asyncio.sleep(0.1)
    assert not wanted.done()
    assert backend.running_models() == {"chat"}
    assert swapper.status()[0].state == "leaving"
    # a new request for the leaving model waits behind the swap instead of starving it
    late = asyncio.create_task(use(swapper, "chat"))
    await asyncio.sleep(0.05)
    assert not late.done()
    await busy.release()
    await asyncio.gather(wanted, late)
    assert backend.started == ["chat", "big", "chat"]  # the late request waited behind the swap
    await late
    assert backend.running_models() == {"chat"}
    assert backend.starts == {"chat": 2, "big": 1}


async def test_disjoint_swaps_overlap(swapper_for: Swappers) -> None:
    backend = FakeBackend()

    def ready_once_started(other: str) -> FakeModel:
        async def health(request: httpx.Request, box: FakeContainer) -> httpx.Response:
            # healthy only once the other model's start has begun: serialised swaps never get there
            return httpx.Response(200 if backend.starts.get(other) else 503)

        return FakeModel(handler=health)

    backend.behaviour = {"chat": ready_once_started("code"), "code": ready_once_started("chat")}
    config = make_config(healthCheckTimeout=5)
    swapper = swapper_for(config, backend)
    await asyncio.gather(use(swapper, "chat"), use(swapper, "code"))
    assert backend.running_models() == {"chat", "code"}


async def test_a_start_that_exits_fails_at_once_quoting_the_log(swapper_for: Swappers) -> None:
    backend = FakeBackend()
    backend.behaviour["chat"] = FakeModel(exit_at_start="error: model file not found")
    swapper = swapper_for(make_config(), backend)
    waiters = [asyncio.create_task(use(swapper, "chat")) for _ in range(3)]
    for waiter in waiters:
        with pytest.raises(StartError) as caught:
            await waiter
        assert "model file not found" in str(caught.value)
        assert "'chat'" in str(caught.value)
    assert backend.boxes == {}
    assert swapper.slots["chat"].state is State.STOPPED
    assert swapper.slots["chat"].in_flight == 0


async def test_health_timeout_leaves_nothing_running(swapper_for: Swappers) -> None:
    clock = Clock()  # the swapper's waits move it: a minute of timeout takes no real time
    backend = FakeBackend(clock=clock)
    backend.behaviour["chat"] = FakeModel(ready_after=600)
    config = make_config(models={"chat": {"image": "img", "healthCheckTimeout": 60}})
    swapper = swapper_for(config, backend, clock)
    with pytest.raises(StartError, match="within healthCheckTimeout"):
        await use(swapper, "chat")
    assert backend.boxes == {}


async def test_engine_errors_name_the_model(swapper_for: Swappers) -> None:
    config = make_config(models={"big": {"image": "missing", "gpus": "all", "pull_policy": "never"}})
    swapper = swapper_for(config, FakeBackend(images={"img"}))
    with pytest.raises(ImageMissing, match="'big'"):
        await use(swapper, "big")
    swapper = swapper_for(config, FakeBackend())
    with pytest.raises(GpuUnavailable, match="'big'"):
        await use(swapper, "big")
    # nothing already running is lost because of one bad request
    backend = FakeBackend(images={"img"})
    swapper = swapper_for(make_config(models={"big": {"image": "missing"}}), backend)
    await use(swapper, "chat")
    with pytest.raises(PullFailed, match="model 'big': cannot pull image 'missing'"):
        await use(swapper, "big")
    assert swapper.slots["big"].state is State.STOPPED
    assert backend.running_models() == {"chat"}  # big runs alone, yet chat never stopped


async def test_a_crash_while_ready_returns_the_model_to_stopped(swapper_for: Swappers) -> None:
    backend = FakeBackend()
    swapper = swapper_for(make_config(), backend)
    await use(swapper, "chat")
    backend.crash("chat")
    await swapper.check()
    assert swapper.slots["chat"].state is State.STOPPED
    await use(swapper, "chat")
    assert backend.starts == {"chat": 2}
    assert backend.running_models() == {"chat"}


async def test_ttl_counts_from_the_end_of_the_last_request(swapper_for: Swappers) -> None:
    backend, clock = FakeBackend(), Clock()
    config = make_config(models={"chat": {"image": "img", "ttl": 60}}, globalTTL=300)
    swapper = swapper_for(config, backend, clock)
    slot = await swapper.acquire("chat")
    await use(swapper, "code")
    clock.now += 120
    await swapper.check()
    assert backend.running_models() == {"chat", "code"}  # busy: never idle
    await slot.release()
    clock.now += 59
    await swapper.check()
    assert backend.running_models() == {"chat", "code"}
    clock.now += 1
    await swapper.check()
    assert backend.running_models() == {"code"}
    clock.now += 300
    await swapper.check()
    assert backend.running_models() == set()


async def test_a_ttl_of_0_never_expires_even_with_a_global_ttl(swapper_for: Swappers) -> None:
    backend, clock = FakeBackend(), Clock()
    config = make_config(models={"chat": {"image": "img", "ttl": 0}}, globalTTL=60)
    swapper = swapper_for(config, backend, clock)
    await use(swapper, "chat")
    await use(swapper, "code")
    clock.now += 60
    await swapper.check()
    assert backend.running_models() == {"chat"}  # code has no ttl of its own: globalTTL
    clock.now += 30 * 86400
    await swapper.check()
    assert backend.running_models() == {"chat"}


async def test_an_absent_health_check_timeout_takes_the_global_one(
    swapper_for: Swappers,
) -> None:
    backend, clock = FakeBackend(), Clock()
    backend.behaviour["chat"] = FakeModel(ready_after=600)
    swapper = swapper_for(make_config(healthCheckTimeout=2), backend, clock)
    with pytest.raises(StartError, match=r"within healthCheckTimeout \(2s\)"):
        await use(swapper, "chat")
    assert backend.boxes == {}


async def test_adoption_keeps_matching_containers_and_replaces_changed_ones(
    swapper_for: Swappers,
) -> None:
    backend = FakeBackend()
    old = make_config(models={"code": {"image": "img", "environment": {"A": "1"}}})
    kept = backend.start(build_spec(old, "chat"))
    backend.start(build_spec(old, "code"))
    other = parse_config({"models": {"chat": {"image": "img"}}, "instance": "other"})
    foreign = backend.start(build_spec(other, "chat"))
    swapper = swapper_for(make_config(), backend)
    assert await swapper.adopt() == ["chat"]
    assert set(backend.boxes) == {kept.id, foreign.id}
    await use(swapper, "chat")
    assert backend.starts == {"chat": 2, "code": 1}  # the adopted one served, no new start


async def test_unload(swapper_for: Swappers) -> None:
    backend = FakeBackend()
    swapper = swapper_for(make_config(), backend)
    await use(swapper, "chat")
    await use(swapper, "code")
    assert await swapper.unload("chat") == ["chat"]
    assert backend.running_models() == {"code"}
    assert await swapper.unload() == ["code"]
    assert backend.running_models() == set()


async def test_preload_goes_through_the_matrix(swapper_for: Swappers) -> None:
    backend = FakeBackend()
    config = make_config(hooks={"on_startup": {"preload": ["chat", "code", "big"]}})
    swapper = swapper_for(config, backend)
    await swapper.preload()
    assert backend.starts == {"chat": 1, "code": 1, "big": 1}
    assert backend.running_models() == {"big"}  # big runs alone: it evicted the pair


async def test_a_leaving_model_started_again_does_not_deadlock_the_swap_waiting_for_it(
    swapper_for: Swappers,
) -> None:
    backend = FakeBackend()
    swapper = swapper_for(make_config(), backend)
    held = await swapper.acquire("big")
    code = asyncio.create_task(use(swapper, "code"))  # big must go: it is leaving
    await asyncio.sleep(0.05)
    big = asyncio.create_task(use(swapper, "big"))  # waits: big is leaving
    await asyncio.sleep(0.05)
    chat = asyncio.create_task(use(swapper, "chat"))  # its swap waits for big to stop
    await asyncio.sleep(0.05)
    await held.release()  # big stops, and the waiting request claims it again at once
    await asyncio.wait_for(asyncio.gather(code, big, chat), timeout=10)
    assert backend.starts == {"big": 2, "code": 1, "chat": 1}


async def test_remains_of_a_dead_container_are_removed(swapper_for: Swappers) -> None:
    backend = FakeBackend()
    swapper = swapper_for(make_config(), backend)
    await use(swapper, "chat")
    dead = backend.start(build_spec(make_config(), "code"))
    backend.crash("code")
    await swapper.check()
    assert dead.id not in backend.boxes
    assert backend.running_models() == {"chat"}


async def test_adoption_replaces_a_container_whose_image_was_rebuilt(
    swapper_for: Swappers,
) -> None:
    backend = FakeBackend()
    backend.start(build_spec(make_config(), "chat"))
    backend.start(build_spec(make_config(models={"code": {"image": "other"}}), "code"))
    backend.rebuild("other")
    swapper = swapper_for(make_config(models={"code": {"image": "other"}}), backend)
    assert await swapper.adopt() == ["chat"]
    assert backend.running_models() == {"chat"}


async def test_adoption_keeps_only_what_the_matrix_allows_together(
    swapper_for: Swappers,
) -> None:
    """Both ran under a config that allowed them together; the new config forbids it."""
    backend = FakeBackend()
    allowing = make_config()
    backend.start(build_spec(allowing, "chat"))
    backend.start(build_spec(allowing, "code"))
    forbidding = make_config(matrix={**MATRIX, "evict_costs": {"k": 5}, "sets": {"a": "c", "b": "k"}})
    swapper = swapper_for(forbidding, backend)
    assert await swapper.adopt() == ["code"]  # the costlier to lose is kept
    assert backend.running_models() == {"code"}
    await use(swapper, "chat")  # and later decisions keep the matrix
    assert backend.running_models() == {"chat"}


def test_allowed_part_keeps_the_costliest_allowed_combination() -> None:
    policy = make_config().policy
    assert allowed_part(policy, ["chat", "code"]) == ("chat", "code")
    assert allowed_part(policy, ["chat", "code", "big"]) == ("big",)  # big costs 10, the pair 2
    cheap_big = make_config(matrix={**MATRIX, "evict_costs": {}}).policy
    assert allowed_part(cheap_big, ["chat", "big"]) == ("big",)  # a tie goes by name
    assert allowed_part(cheap_big, ["code", "chat", "big"]) == ("big",)
    assert allowed_part(make_config(matrix=None).policy, ["chat", "code"]) == ("chat",)  # one at a time


async def test_an_adopted_container_is_starting_until_its_health_check_answers(
    swapper_for: Swappers,
) -> None:
    backend = FakeBackend()
    backend.behaviour["chat"] = FakeModel(ready_after=0.3)
    backend.start(build_spec(make_config(), "chat"))  # `up` was killed while it loaded
    swapper = swapper_for(make_config(), backend)
    assert await swapper.adopt() == ["chat"]
    assert state(swapper, "chat") is State.STARTING
    await asyncio.wait_for(use(swapper, "chat"), timeout=5)  # joins the start: no error
    assert state(swapper, "chat") is State.READY
    assert backend.starts == {"chat": 1}


async def test_an_adopted_container_that_never_becomes_healthy_is_removed(
    swapper_for: Swappers,
) -> None:
    clock = Clock()
    backend = FakeBackend(clock=clock)
    backend.behaviour["chat"] = FakeModel(ready_after=1000)
    config = make_config(healthCheckTimeout=60)
    backend.start(build_spec(config, "chat"))
    swapper = swapper_for(config, backend, clock)
    await swapper.adopt()
    with pytest.raises(StartError, match="healthCheckTimeout"):
        await asyncio.wait_for(use(swapper, "chat"), timeout=10)
    assert backend.running_models() == set()
    assert state(swapper, "chat") is State.STOPPED


async def test_a_container_that_will_not_stop_still_counts_as_running(
    swapper_for: Swappers,
) -> None:
    backend = FakeBackend()
    backend.behaviour["chat"] = FakeModel(unstoppable=True)
    swapper = swapper_for(make_config(), backend)
    await use(swapper, "chat")
    with pytest.raises(
        StartError, match=r"model 'big' failed to start: model 'chat': .* could not be stopped"
    ):
        await use(swapper, "big")  # big runs alone: chat must stop first, and cannot
    assert backend.running_models() == {"chat"}  # big never started beside it
    assert state(swapper, "chat") is State.STOP_FAILED
    assert swapper.running() == ["chat"]
    with pytest.raises(StartError, match="chat"):
        await use(swapper, "big")  # tried again, refused again: never a forbidden pair
    assert backend.running_models() == {"chat"}
    backend.behaviour["chat"] = FakeModel()  # the engine recovers
    await swapper.check()
    assert state(swapper, "chat") is State.STOPPED
    await use(swapper, "big")
    assert backend.running_models() == {"big"}


async def test_a_container_that_will_not_stop_at_adoption_counts_as_running(
    swapper_for: Swappers,
) -> None:
    backend = FakeBackend()
    backend.behaviour["chat"] = FakeModel(unstoppable=True)
    backend.start(build_spec(make_config(models={"chat": {"image": "old"}}), "chat"))
    swapper = swapper_for(make_config(), backend)
    assert await swapper.adopt() == []
    assert swapper.running() == ["chat"]
    with pytest.raises(StartError, match=r"model 'big' failed to start: .*chat"):
        await use(swapper, "big")
    assert backend.running_models() == {"chat"}


async def test_unload_with_a_timeout_stops_a_model_with_requests_in_flight(
    swapper_for: Swappers,
) -> None:
    backend = FakeBackend()
    swapper = swapper_for(make_config(), backend)
    held = await swapper.acquire("chat")  # a long stream, say
    assert await asyncio.wait_for(swapper.unload(timeout=0.1), timeout=5) == ["chat"]
    assert backend.running_models() == set()
    await held.release()
    assert swapper.slots["chat"].in_flight == 0
    await use(swapper, "chat")  # and it starts again as usual


async def test_a_policy_that_cannot_decide_fails_that_start_and_nothing_else(
    swapper_for: Swappers, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = FakeBackend()
    swapper = swapper_for(make_config(), backend)
    await use(swapper, "chat")
    policy = swapper.policy()

    class Broken:
        def decide(self, model: str, running: object, explain: bool = False) -> object:
            raise RuntimeError("no decision")

    monkeypatch.setattr(swapper.board, "policy", lambda: Broken())
    with pytest.raises(StartError, match="no decision"):
        await use(swapper, "code")
    assert state(swapper, "code") is State.STOPPED
    assert backend.running_models() == {"chat"}
    monkeypatch.setattr(swapper.board, "policy", lambda: policy)
    await use(swapper, "code")
    assert backend.running_models() == {"chat", "code"}
