"""Benchmark fit mode (`matrix: {fit: gpu}`): one decision against an exhaustive search.

Run: .venv/bin/python bench/fit_bench.py

Each case is N models running on 8 GPUs of 80 GiB, filled to about 90% (random
footprints: most on one GPU, some on 2 or 4, a tenth pinned; costs drawn with many ties),
and a request for one more model that does not fit beside them. The baseline in the same
run is the exhaustive search (`swapctl.matrix.fit_solver.exhaustive_eviction`): every
subset of what runs, the smallest first, placing each one that could beat the best so far
(with no step budget), up to the size past which none can cost less. It runs on the first
EXHAUSTIVE_DECISIONS cases of each size, each cut off at EXHAUSTIVE_CAP seconds (a cut
one counts as the cap: its median is then a lower bound, shown with >=). Each decision of
the solver is timed alone (perf_counter_ns, the garbage collector off, the median of 5
calls); medians are over DECISIONS random cases.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from swapctl.matrix import fit_solver
from swapctl.matrix.fit import Footprint, Steps, place
from swapctl.matrix.fit_solver import FitPolicy, exhaustive_eviction

GiB = 2**30
GPUS = (80 * GiB,) * 8
FILL = 0.9  # of the GPUs' memory the running models hold, about
SIZES = (10, 20, 30, 60)
DECISIONS = 20  # random cases per size
EXHAUSTIVE_DECISIONS = 5  # cases per size that the exhaustive search also decides
EXHAUSTIVE_CAP = 10.0  # seconds an exhaustive decision may take; past it, cut off


def footprint(rng: random.Random, share: float) -> Footprint:
    """A model holding about `share` bytes in all: most on one GPU, some on 2 or 4."""
    count = rng.choices((1, 2, 4), (7, 2, 1))[0]
    per_gpu = min(80, max(1, round(share * rng.uniform(0.4, 1.6) / count / GiB)))
    pinned = (rng.randrange(len(GPUS)),) if count == 1 and rng.random() < 0.1 else ()
    return Footprint(per_gpu * GiB, count, pinned)


def scenario(running_count: int, seed: int) -> tuple[FitPolicy, str, list[str]]:
    """`running_count` models that fit together, and a target that needs some of them gone."""
    rng = random.Random(seed)
    share = FILL * sum(GPUS) / running_count
    footprints: dict[str, Footprint] = {}
    for i in range(running_count):
        name = f"m{i:02}"
        for _ in range(100):  # a draw shrunk until it fits, else another draw
            drawn = footprint(rng, share)
            while drawn.vram > GiB and not fits(footprints, name, drawn):
                drawn = Footprint(max(GiB, drawn.vram // 2 // GiB * GiB), drawn.count, drawn.pinned)
            if fits(footprints, name, drawn):
                footprints[name] = drawn
                break
        else:
            raise RuntimeError(f"no room left for {running_count} models")
    running = list(footprints)
    for _ in range(100):
        target = Footprint(rng.randint(40, 80) * GiB, rng.choice((1, 1, 2)))  # a big model comes
        if place(GPUS, {"target": target}) is not None and not fits(footprints, "target", target):
            break
    else:
        target = Footprint(GPUS[0], len(GPUS))  # the whole machine: everything on a GPU goes
    footprints["target"] = target
    costs = {name: rng.choice((1, 1, 1, 2, 3, 5, 10, 30)) for name in footprints}
    return FitPolicy(costs, footprints, GPUS), "target", running


def fits(footprints: dict[str, Footprint], name: str, drawn: Footprint) -> bool:
    return place(GPUS, {**footprints, name: drawn}, Steps(2_000)) is not None


def timed(call: Callable[[], object], repeats: int) -> int:
    """The median nanoseconds of `repeats` calls."""
    samples = []
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            call()
            samples.append(time.perf_counter_ns() - start)
    finally:
        gc.enable()
    return int(statistics.median(samples))


def us(ns: float) -> str:
    value = ns / 1000
    return f"{value:,.1f}" if value < 10_000 else f"{value:,.0f}"


class _Cut(Exception):
    pass


def exhaustive(policy: FitPolicy, target: str, running: list[str]) -> tuple[int, tuple[str, ...] | None]:
    """(nanoseconds, the eviction) of the exhaustive search; None when it was cut off at
    EXHAUSTIVE_CAP, its placements made to raise past the deadline."""
    deadline = time.perf_counter() + EXHAUSTIVE_CAP

    def timed_place(*args: Any, **kwargs: Any) -> object:
        if time.perf_counter() > deadline:
            raise _Cut
        return place(*args, **kwargs)

    start = time.perf_counter_ns()
    vars(fit_solver)["place"] = timed_place
    try:
        found: tuple[str, ...] | None = exhaustive_eviction(
            policy.capacities, policy.footprints, policy.costs, target, running
        )
    except _Cut:
        found = None
    finally:
        vars(fit_solver)["place"] = place
    return time.perf_counter_ns() - start, found


def ratio(value: float) -> str:
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2g}x"


def row(size: int) -> list[str]:
    fast: list[int] = []
    slow: list[int] = []
    evicted: list[int] = []
    finished = same_models = same_cost = 0
    for seed in range(DECISIONS):
        policy, target, running = scenario(size, seed)
        decision = policy.decide(target, running)
        evicted.append(len(decision.evict))
        fast.append(timed(lambda: policy.decide(target, running), 5))  # noqa: B023
        if seed < EXHAUSTIVE_DECISIONS:
            took, expected = exhaustive(policy, target, running)
            slow.append(took)
            if expected is not None:
                finished += 1
                same_models += decision.evict == expected
                same_cost += decision.cost == sum(policy.cost(m) for m in expected)
    fast_p50 = statistics.median(fast)
    cap = int(EXHAUSTIVE_CAP * 1e9)
    slow_p50 = statistics.median(min(took, cap) for took in slow)
    bound = ">= " if finished <= len(slow) // 2 else ""
    return [
        str(size),
        f"{statistics.median(evicted):g}",
        us(fast_p50),
        us(sorted(fast)[len(fast) * 9 // 10]),
        us(max(fast)),
        f"{bound}{us(slow_p50)}",
        f"{finished} of {len(slow)}",
        f"{bound}{ratio(slow_p50 / statistics.median(fast[: len(slow)]))}",
        f"{same_cost} / {same_models}",
    ]


def main() -> None:
    print(f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"Python {platform.python_implementation()} {sys.version.split()[0]}")
    print()
    header = [
        "running models",
        "evicted (p50)",
        "decide p50 µs",
        "decide p90 µs",
        "decide max µs",
        "exhaustive p50 µs",
        f"exhaustive done in {EXHAUSTIVE_CAP:g} s",
        "speed-up (p50, same cases)",
        "same cost / same models",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for size in SIZES:
        print("| " + " | ".join(row(size)) + " |", flush=True)
    print()
    print(
        f"{DECISIONS} random cases per row on 8 GPUs of 80 GiB, each decision the median of 5 calls;"
        f" the exhaustive search on the first {EXHAUSTIVE_DECISIONS}, cut off at {EXHAUSTIVE_CAP:g} s."
    )


if __name__ == "__main__":
    main()
