"""The life of a model, written down once: its states, the moves between them, who makes
each move, and for each transitional state the one task that owns it and its deadline.

    stopped -> pulling -> starting -> ready -> (leaving) -> stopping -> stopped
       |                    ^  |                              |  |
       +--------------------+  +-> stopped (its start failed)  |  +-> sleeping -> starting (woken)
                                                               +-> stop-failed -> stopping (again)

| state       | counted by decisions | owner (the task that ends it)         | deadline (watchdog)        |
|-------------|----------------------|---------------------------------------|----------------------------|
| stopped     | no                   | -                                     | -                          |
| pulling     | no: it holds nothing | its start (`Starts._swap`)            | the pull's own end         |
| starting    | yes                  | its start (`_swap`, or adoption's)    | health + grace + margin,   |
|             |                      |                                       | from its last step's start |
| ready       | yes                  | - (requests hold leases on it)        | -                          |
| leaving     | no (derived: ready,  | the eviction that chose it            | its requests in flight     |
|             | or starting, and     |                                       |                            |
|             | chosen to stop)      |                                       |                            |
| stopping    | yes: its container   | the eviction (`Stops.evict`) or the   | grace + health + margin    |
|             | may still run        | crash check (`Stops.mark_crashed`)    |                            |
| stop-failed | yes: it still runs   | - (the upkeep tries again)            | -                          |
| sleeping    | no: its memory freed | - (a request wakes it: -> starting)   | -                          |

Who moves what: a request's admission claims a stopped or sleeping model (-> pulling or
starting, spawning its start); its start moves it on (-> starting once decided, -> ready,
or -> stopped when it fails); an eviction (a decision's, an unload's, a reload's, the ttl's)
marks it leaving, waits for its start to settle and its requests to finish, then stops it
(-> stopping -> stopped, sleeping or stop-failed); the upkeep finds crashes (-> stopping ->
stopped) and retries stuck stops; adoption at start-up takes over what runs (stopped ->
ready, starting or sleeping). Every move goes through `Slot.move`, called by `Board.move`
with the lock held; a move to a resting state (stopped, sleeping, stop-failed) ends the
tenure: `leaving` is cleared and `stops` counted, so a wait for that tenure ends with it.

A start's steps (`Step`): its image (looked for, and pulled when its pull_policy says so:
before anything is decided, so a pull evicts nothing), evicting what is in its way,
creating the container (or waking its sleeping one), then loading until the health check
answers. `stop-failed`: its container outlived a stop and a kill, so it still counts as
running. `sleeping` (vLLM's `sleep` level, evicted to make room): its server freed its GPU
memory but its container runs on; stopping it for real (unload, ttl, a reload) goes
sleeping -> stopping -> stopped.
"""

from __future__ import annotations

import enum
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from swapctl.backend import Container, Pulled

if TYPE_CHECKING:
    import asyncio  # its futures and tasks are only named here: `status` reads a slot without asyncio


class State(enum.Enum):
    STOPPED = "stopped"
    PULLING = "pulling"  # its image is looked for (and pulled): nothing decided, nothing held
    STARTING = "starting"
    READY = "ready"
    LEAVING = "leaving"  # derived: ready, and chosen to stop
    STOPPING = "stopping"
    STOP_FAILED = "stop-failed"
    SLEEPING = "sleeping"  # its container runs, its server asleep: counted as stopped


class Step(enum.Enum):
    """Where a start stands."""

    PULLING = "pulling"  # its image is looked for, and pulled if need be (`pulled`: how far)
    EVICTING = "evicting"  # the models in its way finish their requests and stop
    WAKING = "waking"  # its sleeping container wakes (in place of the two steps below)
    STARTING = "starting"  # its container is being created and started
    LOADING = "loading"  # its container runs; its server does not answer its health check yet


BEGINNING = (State.PULLING, State.STARTING)  # a start under way, with its step
TRANSITIONAL = (*BEGINNING, State.STOPPING)  # each owned by one task, which ends it
RESTING = (State.STOPPED, State.SLEEPING, State.STOP_FAILED)  # a tenure over: nothing under way
RECENT_STARTS = 5  # measured starts kept per model, for estimates
# The moves `Slot.move` allows, between the states a slot stores (never LEAVING).
MOVES: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset(
        {State.PULLING, State.STARTING, State.READY, State.STOP_FAILED, State.SLEEPING}  # or adopted
    ),
    State.PULLING: frozenset({State.STARTING, State.STOPPED}),  # decided once its image is here; or not
    State.STARTING: frozenset({State.READY, State.STOPPED, State.STOP_FAILED}),
    State.READY: frozenset({State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED, State.STOP_FAILED, State.SLEEPING}),
    State.STOP_FAILED: frozenset({State.STOPPING}),
    State.SLEEPING: frozenset({State.STARTING, State.STOPPING}),  # woken; or stopped for real
}


@dataclass
class Slot:
    """One configured model. Only `move` writes `phase`, `leaving`, `container`, `stops` and
    the start's `step`, `evicting` and `pulled`; the swapper appends each measured start to `durations`."""

    model: str
    phase: State = State.STOPPED
    leaving: bool = False
    container: Container | None = None
    in_flight: int = 0
    last_used: float = 0.0
    ready_since: float | None = None
    start: asyncio.Future[None] | None = field(default=None, repr=False)
    stops: int = 0  # times it stopped or fell asleep: a stop awaited is over even if it started again
    step: Step | None = None  # while starting
    evicting: tuple[str, ...] = ()  # while starting: the models stopped to make room
    pulled: Pulled | None = None  # while starting: how far the pull of its image has come
    starting_since: float = 0.0
    since: float = 0.0  # when its phase or its start's step last changed: the watchdog's clock
    owner: asyncio.Task[None] | None = field(default=None, repr=False)  # the task moving it, in transition
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_STARTS), repr=False)

    @property
    def state(self) -> State:
        return State.LEAVING if self.leaving and self.phase is State.READY else self.phase

    @property
    def running(self) -> bool:
        """Counted by decisions: its container may run, and it is not already on its way out."""
        return self.phase not in (State.STOPPED, State.PULLING, State.SLEEPING) and not self.leaving

    @property
    def holding(self) -> bool:
        """It has, or is deciding to have, a container that runs: a stop of it can be waited for."""
        return self.phase in (State.STARTING, State.READY, State.STOPPING)

    def move(
        self,
        phase: State | None = None,
        *,
        leaving: bool | None = None,
        container: Container | None = None,
        step: Step | None = None,
        evicting: tuple[str, ...] | None = None,
        pulled: Pulled | None = None,
        owner: asyncio.Task[None] | None = None,
        now: float = 0.0,
    ) -> None:
        """The one writer. Moving to stopped forgets the container and counts a stop (falling
        asleep keeps it, and counts one); moving to ready records when; moving to starting,
        when it began (a start's step and evictions hold only while it starts)."""
        if (phase is not None and phase is not self.phase) or (step is not None and step is not self.step):
            self.since = now
        if phase is not None and phase is not self.phase:
            assert phase in MOVES[self.phase], f"{self.model}: no move from {self.phase} to {phase}"
            if self.phase in BEGINNING and phase not in BEGINNING:
                self.step, self.evicting, self.pulled = None, (), None
            if phase in BEGINNING and self.phase not in BEGINNING:
                self.starting_since = now  # a pull before its decision counts in its start
            self.phase = phase
            if phase is State.STOPPED:
                self.container, self.stops = None, self.stops + 1
            elif phase is State.SLEEPING:
                self.stops += 1  # its memory is back: an eviction awaited is over; its container stays
            elif phase is State.READY:
                self.ready_since = self.last_used = now
            if phase not in TRANSITIONAL:
                self.owner = None
            if phase in RESTING:
                self.leaving = False  # its tenure is over: whoever evicted it has nothing left to do
        if owner is not None and self.phase in TRANSITIONAL:
            self.owner = owner
        if container is not None:
            self.container = container
        if leaving is not None:
            self.leaving = leaving
        if step is not None and self.phase in BEGINNING:
            self.step = step
        if evicting is not None and self.phase in BEGINNING:
            self.evicting = evicting
        if pulled is not None and self.phase in BEGINNING:
            self.pulled = pulled


@dataclass(frozen=True)
class Progress:
    """How far a model's start has come, for those who wait on it."""

    model: str
    step: Step
    evicting: tuple[str, ...]  # the models stopped to make room for it
    elapsed: float  # seconds since its start began (a pull before its decision included)
    last_starts: tuple[float, ...]  # its last measured starts, in seconds, oldest first
    pulled: Pulled | None = None  # how far the pull of its image has come, once one began
    waking: bool = False  # its sleeping container is woken: `last_starts` are its last wakes

    @property
    def estimate(self) -> float | None:
        """How long a start of this model takes, from its last ones; None before its first."""
        return statistics.median(self.last_starts) if self.last_starts else None

    @classmethod
    def of(cls, slot: Slot, now: float) -> Progress | None:
        if slot.phase not in BEGINNING or slot.step is None:
            return None
        elapsed = now - slot.starting_since
        return cls(slot.model, slot.step, slot.evicting, elapsed, tuple(slot.durations), slot.pulled)


@dataclass(frozen=True)
class ModelStatus:
    model: str
    state: str
    container: str | None
    host_port: int | None
    in_flight: int
    ready_seconds: float | None
    idle_seconds: float | None
    gpu_memory: Mapping[str, int] | None = None  # bytes per GPU index, as last measured
    gpus: tuple[int, ...] | None = None  # the GPUs swapctl placed its container on, if it did

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def of(
        cls,
        slot: Slot,
        now: float,
        gpu_memory: Mapping[str, int] | None = None,
        gpus: tuple[int, ...] | None = None,
    ) -> ModelStatus:
        ready = slot.phase is State.READY
        return cls(
            model=slot.model,
            state=slot.state.value,
            container=slot.container.name if slot.container else None,
            host_port=slot.container.host_port if slot.container else None,
            in_flight=slot.in_flight,
            ready_seconds=now - slot.ready_since if ready and slot.ready_since is not None else None,
            idle_seconds=now - slot.last_used if ready and not slot.in_flight else None,
            gpu_memory=gpu_memory,
            gpus=gpus if slot.container else None,
        )
