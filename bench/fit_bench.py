"""Benchmark fit mode (`matrix: {fit: gpu}`): one decision against an exhaustive search.

Run: .venv/bin/python bench/fit_bench.py

Each case is N models running on 8 GPUs of 80 GiB, filled close to full (random
footprints: most on one GPU, some on 2 or 4, a tenth pinned; costs drawn with many ties),
and a request for one more model that does not fit beside them. The exhaustive search
(`swapctl.matrix.fit_solver.exhaustive_eviction`) tries all 2^N subsets of what runs,
placing each one that could beat the best so far; the two must agree. Each decision is
timed alone (perf_counter_ns, the garbage collector off); medians are over DECISIONS
random cases, each the median of its repeats.
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

from swapctl.matrix.fit import Footprint, place
from swapctl.matrix.fit_solver import FitPolicy, exhaustive_eviction

GiB = 2**30
GPUS = (80 * GiB,) * 8
SIZES = (10, 20, 30, 60)
DECISIONS = 40  # random cases per size
EXHAUSTIVE_MAX = 20  # running models; beyond, 2^N subsets are not tried
EXHAUSTIVE_DECISIONS = {10: 40, 20: 5}  # the exhaustive search at 20 takes seconds a call


def footprint(rng: random.Random, share: float) -> Footprint:
    """A model holding about `share` bytes in all: most on one GPU, some on 2 or 4."""
    count = rng.choices((1, 2, 4), (7, 2, 1))[0]
    per_gpu = min(80, max(1, round(share * rng.uniform(0.4, 1.6) / count / GiB)))
    pinned = (rng.randrange(len(GPUS)),) if count == 1 and rng.random() < 0.1 else ()
    return Footprint(per_gpu * GiB, count, pinned)


def scenario(running_count: int, seed: int) -> tuple[FitPolicy, str, list[str]]:
    """`running_count` models that fit together, and a target that needs some of them gone."""
    rng = random.Random(seed)
    share = 0.97 * sum(GPUS) / running_count
    footprints: dict[str, Footprint] = {}
    running: list[str] = []
    while len(running) < running_count:
        name = f"m{len(footprints):03}"
        footprints[name] = footprint(rng, share)
        if place(GPUS, {m: footprints[m] for m in [*running, name]}) is not None:
            running.append(name)
    while True:
        footprints["target"] = footprint(rng, share * 2)
        alone = place(GPUS, {"target": footprints["target"]}) is not None
        if alone and place(GPUS, footprints_of(footprints, [*running, "target"])) is None:
            break
    costs = {name: rng.choice((1, 1, 1, 2, 3, 5, 10, 30)) for name in footprints}
    return FitPolicy(costs, footprints, GPUS), "target", running


def footprints_of(footprints: dict[str, Footprint], names: list[str]) -> dict[str, Footprint]:
    return {m: footprints[m] for m in names}


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


def row(size: int) -> list[str]:
    fast: list[int] = []
    slow: list[int] = []
    evicted: list[int] = []
    for seed in range(DECISIONS):
        policy, target, running = scenario(size, seed)
        decision = policy.decide(target, running)
        evicted.append(len(decision.evict))
        fast.append(timed(lambda: policy.decide(target, running), 5))  # noqa: B023
        if size <= EXHAUSTIVE_MAX and seed < EXHAUSTIVE_DECISIONS.get(size, 0):
            args = (policy.capacities, policy.footprints, policy.costs, target, running)
            expected = exhaustive_eviction(*args)
            assert decision.evict == expected, (size, seed, decision.evict, expected)
            slow.append(timed(lambda: exhaustive_eviction(*args), 1))  # noqa: B023
    fast_p50 = statistics.median(fast)
    if slow:
        slow_p50 = statistics.median(slow)
        exhaustive, ratio = f"{us(slow_p50)} ({len(slow)} decisions)", f"{slow_p50 / fast_p50:,.0f}x"
    else:
        exhaustive, ratio = f"not run, 2^{size} subsets", "-"
    worst = max(fast)
    return [
        str(size),
        f"{statistics.median(evicted):g}",
        us(fast_p50),
        us(sorted(fast)[len(fast) * 9 // 10]),
        us(worst),
        exhaustive,
        ratio,
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
        "speed-up (p50)",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" for _ in header) + "|")
    for size in SIZES:
        print("| " + " | ".join(row(size)) + " |", flush=True)
    print()
    print(f"{DECISIONS} random cases per row on 8 GPUs of 80 GiB, each decision the median of 5 calls.")


if __name__ == "__main__":
    main()
