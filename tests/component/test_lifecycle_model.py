"""The lifecycle tested against a model of itself: a Hypothesis state machine drives the
swapper over the gated fake engine (tests/gated.py) and a manual clock. Every await that
can be slow or fail is a step the machine takes when it likes: an image check, a pull, a
container's start and stop, each health check answer, a sleep and a wake; besides them,
requests arrive, finish, or are left by their clients, models crash, are unloaded, the config
is reloaded, time passes, and `up` restarts (a new swapper adopts what the engine runs).

Invariants, checked after every step:
- the matrix: the models whose containers run (and are not asleep) are allowed together;
- only a fault fails a request: while no step failed and nobody unloaded, reloaded, crashed
  or restarted anything, every request that ended was served; a failed one names its model;
- nothing waits on nothing: while a request waits for its model, some step waits at a gate
  or some request is being served (what the world outside can still move);
- every model in a transitional state (pulling, starting, stopping) has a live task that owns
  it, and the watchdog never finds one without (it may end one held past its deadline).
And at the end of each run, once every gate opens and every served request finishes, every
request has ended and no model is left in a transitional state.
"""

from __future__ import annotations

import asyncio
import gc
import os
from dataclasses import dataclass, field
from typing import Any

import httpx
from gated import GatedBackend, GatedServer, Gates, Op
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from support import Clock

from swapctl.backend.fake import FakeBackend, FakeImage, FakeModel
from swapctl.config import Config, parse_config
from swapctl.errors import Busy, StopFailed, SwapctlError
from swapctl.lifecycle import Lease, State, Swapper
from swapctl.lifecycle.slot import RESTING
from swapctl.matrix import allowed_part

MODELS = ("a", "b", "c", "d")
TRANSITIONAL = (State.PULLING, State.STARTING, State.STOPPING)
HELD = ("image", "pull", "start", "stop", "health", "sleep", "wake")


def config_of(version: int) -> Config:
    """a and b run together, b and d too, c alone; c pulls its image at every start; d
    sleeps when evicted. `version` changes b's command: a reload replaces b."""
    models: dict[str, Any] = {m: {"image": "img", "stop_grace_period": 0} for m in MODELS}
    models["b"]["command"] = ["serve", f"--version={version}"]
    models["c"] = {"image": "img-c", "pull_policy": "always", "stop_grace_period": 0}
    models["d"]["sleep"] = 1
    document = {
        "instance": "test",
        "healthCheckTimeout": 30,
        "models": models,
        "matrix": {"sets": {"ab": "a & b", "bd": "b & d", "c": "c"}, "evict_costs": {"d": 2}},
    }
    return parse_config(document)


@dataclass
class Request:
    model: str
    faults: int  # faults seen when it was admitted
    task: asyncio.Task[None] | None = None
    lease: Lease | None = None
    outcome: str | None = None  # served, left, or the error
    error_model: str | None = None
    refused_stuck: bool = False  # refused at once: its model is busy, or its container would not stop
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Lifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.fake = FakeBackend(images={"img"}, clock=self.clock)
        self.fake.registry["img-c"] = FakeImage()
        self.gates = Gates(HELD)
        handler = GatedServer(self.gates)
        for model in MODELS:
            self.fake.behaviour[model] = FakeModel(handler=handler)
        self.sleeping = handler.sleeping
        self.version = 1
        self.requests: list[Request] = []
        self.disturbed = 0  # unloads, reloads, crashes and restarts so far: each may fail requests
        self.chores: list[asyncio.Task[Any]] = []  # unloads, reloads, checks under way
        self.dead: list[tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = []  # killed `up`s
        self.dead_clients: list[httpx.AsyncClient] = []  # of `up`s whose adoption failed
        # a killed `up`'s tasks and the steps it waited for, referenced till the end
        self.kept: list[tuple[list[asyncio.Task[Any]], list[Op]]] = []
        self.at_rest: dict[str, int] = {}  # model -> faults() when it was last seen at rest
        self.swapper = self._run(self._swapper())
        self.serving_since = asyncio.Event()
        self.serving_since.set()

    # --- the world -------------------------------------------------------------------------

    async def _swapper(self) -> Swapper:
        self.client = httpx.AsyncClient(transport=self.fake.transport)
        backend = GatedBackend(self.fake, self.gates)
        return Swapper(
            config_of(self.version), backend, self.client, clock=self.clock, sleep=self.clock.sleep
        )

    def _run(self, work: Any) -> Any:
        return self.loop.run_until_complete(work)

    async def _settle(self) -> None:
        for _ in range(60):
            await asyncio.sleep(0)

    def settle(self) -> None:
        self._run(self._settle())

    def faults(self) -> int:
        return len(self.gates.failed) + self.disturbed

    def waiting(self) -> list[Request]:
        return [r for r in self.requests if r.outcome is None and r.lease is None]

    def serving(self) -> list[Request]:
        return [r for r in self.requests if r.outcome is None and r.lease is not None]

    async def _request(self, request: Request) -> None:
        try:
            await self.serving_since.wait()  # `up` listens once its adoption is over
            ticket = await self.swapper.admit(request.model)
            request.lease = await ticket.lease()
            await request.done.wait()
            await request.lease.release()
            request.outcome = "served"
        except (StopFailed, Busy) as error:
            request.outcome, request.error_model, request.refused_stuck = str(error), error.model, True
        except SwapctlError as error:
            request.outcome, request.error_model = str(error), getattr(error, "model", None)
        except asyncio.CancelledError:
            request.outcome = "left"
            if request.lease is not None:
                await request.lease.release()

    # --- rules: requests -------------------------------------------------------------------

    @rule(model=st.sampled_from(MODELS))
    def request(self, model: str) -> None:
        slot = self.swapper.slots[model]
        # one that joins a start (or a stop) under way shares the faults since it began
        request = Request(model, self.faults() if slot.phase in RESTING else self.at_rest.get(model, 0))
        request.task = self.loop.create_task(self._request(request))
        self.requests.append(request)
        self.settle()

    @precondition(lambda self: self.serving())
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.serving()))
        request.done.set()
        self.settle()

    @precondition(lambda self: self.waiting())
    @rule(data=st.data())
    def client_leaves(self, data: st.DataObject) -> None:
        request = data.draw(st.sampled_from(self.waiting()))
        assert request.task is not None
        request.task.cancel()
        self.settle()

    # --- rules: the steps outside ----------------------------------------------------------

    @precondition(lambda self: self.gates.pending)
    @rule(data=st.data(), ok=st.sampled_from((True, True, True, False)))
    def answer(self, data: st.DataObject, ok: bool) -> None:
        """A step waiting at its gate goes on (mostly) or fails."""
        op = data.draw(st.sampled_from(self.gates.pending))
        self.gates.answer(op, ok)
        self.settle()

    @rule()
    def time_passes(self) -> None:
        """Past every model's health check timeout: a step held meanwhile was slow, a fault
        (the watchdog may end what it held up)."""
        self.disturbed += bool(self.gates.pending)
        self.clock.now += 31
        self.settle()

    @rule(model=st.sampled_from(MODELS))
    def crash(self, model: str) -> None:
        if model in self.fake.running_models():
            self.disturbed += 1
            self.fake.crash(model)
        self.chores.append(self.loop.create_task(self.swapper.check()))
        self.settle()

    @rule(model=st.one_of(st.none(), st.sampled_from(MODELS)))
    def unload(self, model: str | None) -> None:
        self.disturbed += 1
        self.chores.append(self.loop.create_task(self.swapper.unload(model)))
        self.settle()

    @rule()
    def reload(self) -> None:
        self.disturbed += 1
        self.version += 1
        self.chores.append(self.loop.create_task(self.swapper.reload(config_of(self.version))))
        self.settle()

    @rule()
    def restart(self) -> None:
        """`up` is killed (-9) and started again: nothing of the old process runs on (its event
        loop is never run again), its requests are cut off, the containers stay, and a new
        swapper adopts them."""
        self.disturbed += 1
        for request in self.requests:
            if request.outcome is None:
                request.outcome = "left"  # its connection died with the process
        # what the old process waited for: nobody waits any more (kept, with its tasks, so that
        # no garbage collection runs their clean-up at some random later moment)
        self.dead.append((self.loop, self.client))
        self.kept.append((list(asyncio.all_tasks(self.loop)), list(self.gates.pending)))
        self.gates.pending.clear()
        self.loop = asyncio.new_event_loop()
        self.swapper = self._run(self._swapper())
        self.serving_since = asyncio.Event()
        self.chores = [self.loop.create_task(self._adopt())]
        self.settle()

    async def _adopt(self) -> None:
        """`up` listens once its adoption is over; if it fails, `up` exits and is started again."""
        for _ in range(20):
            try:
                await self.swapper.adopt()
                break
            except SwapctlError as error:
                failure = error
                self.dead_clients.append(self.client)
                self.swapper = await self._swapper()
                await asyncio.sleep(0)
        else:
            raise AssertionError(f"`up` could not adopt what runs, 20 times: {failure}")
        self.serving_since.set()

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def faults_since_rest(self) -> None:
        """(Bookkeeping, not a promise: the faults seen when each model was last at rest.)"""
        for model, slot in self.swapper.slots.items():
            if slot.phase in RESTING:
                self.at_rest[model] = self.faults()

    @invariant()
    def the_matrix_holds(self) -> None:
        present = {c.model for c in self.fake.list("test") if c.running and c.id not in self.sleeping}
        allowed = set(allowed_part(self.swapper.policy(), sorted(present)))
        assert allowed == present, f"{sorted(present)} run together"

    @invariant()
    def only_a_fault_fails_a_request(self) -> None:
        for request in self.requests:
            if request.outcome in (None, "served", "left"):
                continue
            assert request.error_model == request.model, f"{request.model}: {request.outcome}"
            if request.refused_stuck and "busy" in (request.outcome or ""):
                continue  # its concurrencyLimit: an answer, not a failure
            # refused for a stop that failed before it came, or failed by a fault while it waited
            since = 0 if request.refused_stuck else request.faults
            assert self.faults() > since, f"{request.model} failed with no fault: {request.outcome}"

    @invariant()
    def nothing_waits_on_nothing(self) -> None:
        if self.waiting():
            stuck = {m: s.state.value for m, s in self.swapper.slots.items()}
            assert self.gates.pending or self.serving(), f"requests wait, nothing moves: {stuck}"

    @invariant()
    def no_chore_dies_of_a_bug(self) -> None:
        """Unloads, reloads, checks and adoptions end, or fail with an error for a person."""
        for task in self.chores:
            if task.done() and not task.cancelled() and task.exception() is not None:
                error = task.exception()
                assert isinstance(error, SwapctlError), repr(error)

    @invariant()
    def the_watchdog_finds_no_orphan(self) -> None:
        orphans = [str(error) for _, error in self.swapper.board.alarms.values() if "no task" in str(error)]
        assert not orphans, orphans

    @invariant()
    def each_transitional_state_has_its_owner(self) -> None:
        for slot in self.swapper.slots.values():
            if slot.phase in TRANSITIONAL:
                assert slot.owner is not None and not slot.owner.done(), f"{slot.model}: {slot.phase}"

    def teardown(self) -> None:
        try:
            self.gates.free()
            for _ in range(20):
                for request in self.serving():
                    request.done.set()
                self.settle()
            self._run(self._settle())
            unfinished = [(r.model, r.lease is not None) for r in self.requests if r.outcome is None]
            slots = {m: (s.state.value, s.in_flight, s.leaving) for m, s in self.swapper.slots.items()}
            assert not unfinished, f"requests never ended: {unfinished}; slots {slots}"
            stuck = {m: s.state.value for m, s in self.swapper.slots.items() if s.phase in TRANSITIONAL}
            assert not stuck, f"models left in a transitional state: {stuck}"
        finally:
            for _, steps in self.kept:  # the engine calls of killed `up`s end (failed), as a
                for op in steps:  # real engine's do once their client is gone
                    if not op.answer.done():
                        op.answer.set_result(False)
            for loop, client in [*self.dead, (self.loop, self.client)]:
                self.loop = loop
                self._run(self._close(client))
                loop.close()
            if self.kept:  # a killed `up` left tasks: collected now, never in the middle of the next run
                self.kept.clear()
                gc.collect()

    async def _close(self, client: httpx.AsyncClient) -> None:
        """End what still runs on this loop (and what their clean-up starts), then its client."""
        for _ in range(10):
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            try:
                async with asyncio.timeout(10):  # real seconds: a task that cannot end is a bug
                    await asyncio.gather(*tasks, return_exceptions=True)
            except TimeoutError:
                raise AssertionError(f"tasks that never end once cancelled: {tasks}") from None
        await client.aclose()
        for other in self.dead_clients:
            await other.aclose()
        self.dead_clients.clear()


Lifecycle.TestCase.settings = settings(
    # the same 600 runs each time in `make test`; SWAPCTL_LIFECYCLE_EXAMPLES=N searches afresh
    max_examples=int(os.environ.get("SWAPCTL_LIFECYCLE_EXAMPLES", "600")),
    derandomize="SWAPCTL_LIFECYCLE_EXAMPLES" not in os.environ,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_lifecycle = Lifecycle.TestCase
