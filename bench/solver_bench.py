"""Benchmark MatrixPolicy.decide against the full-expansion oracle; prints a Markdown table.

Run: .venv/bin/python bench/solver_bench.py

Each decide() call is timed alone with perf_counter_ns, the garbage collector off (as
timeit does), repeated for about TIME_BUDGET_S per measurement; nothing is cached between
repetitions. The naive solver (swapctl.matrix.expand.naive_decide) expands every set at
each call, as a solver without a compiled form would.
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
from dataclasses import dataclass

from swapctl.matrix import MatrixPolicy, Program, compile_matrix
from swapctl.matrix.expand import naive_decide
from swapctl.matrix.program import combinations_count

TIME_BUDGET_S = 1.0  # per measurement of the fast solver
NAIVE_BUDGET_S = 2.0  # per measurement of the naive solver
NAIVE_MAX_COMBINATIONS = 10**5
GOAL_US = 1000.0


@dataclass(frozen=True)
class Case:
    name: str
    program: Program
    target: str
    running: tuple[str, ...]

    @property
    def combinations(self) -> int:
        return sum(combinations_count(s.root) for s in self.program.sets)


def alternatives_case(groups: int) -> Case:
    """One set `t & (10 alternatives) x groups`; two running members, one outsider."""
    alternatives = [[f"g{g}_{i}" for i in range(10)] for g in range(groups)]
    models = ["t", "outsider", *(m for group in alternatives for m in group)]
    source = "t & " + " & ".join("(" + " | ".join(group) + ")" for group in alternatives)
    program = compile_matrix({}, {"g1_7": 5}, {"big": source}, models)
    return Case(f"t & (10 alt.) x {groups}", program, "t", ("g0_3", "g1_7", "outsider"))


def pool_case(sets: int, seed: int = 7) -> Case:
    """`sets` sets `(a|b|c) & d & (e|f)` over 60 pool models; the first and ~40% of the rest name p0."""
    rng = random.Random(seed)
    pool = [f"p{i}" for i in range(60)]
    sources: dict[str, str] = {}
    for i in range(sets):
        a, b, c, d, e, f = rng.sample(pool[1:], 6)
        picks = [a, b, c, d, e, f]
        if i == 0 or rng.random() < 0.4:  # the first set always names p0
            picks[rng.randrange(6)] = "p0"
        a, b, c, d, e, f = picks
        sources[f"s{i}"] = f"({a} | {b} | {c}) & {d} & ({e} | {f})"
    costs = {m: rng.choice((1, 1, 1, 2, 5, 50)) for m in pool}
    running = tuple(rng.sample(pool[1:], 4))
    program = compile_matrix({}, costs, sources, pool)
    naming = len(program.sets_by_model[0])
    label = f"{sets} set{'s' if sets > 1 else ''} over 60 models ({naming} name p0)"
    return Case(label, program, "p0", running)


def timed(call: Callable[[], object], budget_s: float, min_reps: int, max_reps: int) -> list[int]:
    """Nanoseconds per call, repeated until the budget is spent (at least min_reps times)."""
    samples: list[int] = []
    gc.disable()
    try:
        deadline = time.perf_counter() + budget_s
        while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() < deadline):
            start = time.perf_counter_ns()
            call()
            samples.append(time.perf_counter_ns() - start)
    finally:
        gc.enable()
    return samples


def median_p90_us(samples: list[int]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) / 1000, ordered[min(len(ordered) - 1, len(ordered) * 9 // 10)] / 1000


def us(value: float) -> str:
    return f"{value:,.1f}" if value < 10_000 else f"{value:,.0f}"


def run(case: Case, notes: list[str]) -> list[str]:
    policy = MatrixPolicy(case.program)
    target, running = case.target, case.running
    fast = median_p90_us(timed(lambda: policy.decide(target, running), TIME_BUDGET_S, 50, 100_000))
    explain = median_p90_us(
        timed(lambda: policy.decide(target, running, explain=True), TIME_BUDGET_S, 50, 100_000)
    )
    naive_cell, ratio_cell = "-", "-"
    if case.combinations > NAIVE_MAX_COMBINATIONS:
        notes.append(f"{case.name}: naive skipped, {case.combinations:,} combinations to expand per call")
        naive_cell = f"- [{len(notes)}]"
    else:
        start = time.perf_counter()
        expected = naive_decide(case.program, target, running)
        first_s = time.perf_counter() - start
        got = policy.decide(target, running)
        assert (got.set, got.cost) == (expected.set, expected.cost), (case.name, got, expected)
        if first_s > NAIVE_BUDGET_S:
            notes.append(f"{case.name}: naive skipped, one call took {first_s:.1f} s")
            naive_cell = f"- [{len(notes)}]"
        else:
            call = lambda: naive_decide(case.program, target, running)  # noqa: E731
            naive = median_p90_us(timed(call, NAIVE_BUDGET_S, 3, 100_000))
            naive_cell = us(naive[0])
            ratio = naive[0] / fast[0]
            ratio_cell = f"{ratio:.1f}x" if ratio < 10 else f"{ratio:,.0f}x"
    goal = (
        "yes"
        if fast[0] < GOAL_US and explain[0] < GOAL_US
        else ("decide only" if fast[0] < GOAL_US else "no")
    )
    return [
        case.name,
        f"{case.combinations:,}",
        us(fast[0]),
        us(fast[1]),
        us(explain[0]),
        us(explain[1]),
        naive_cell,
        ratio_cell,
        goal,
    ]


def main() -> None:
    print(f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"Python {platform.python_implementation()} {sys.version.split()[0]}")
    print()
    header = [
        "case",
        "combinations",
        "decide p50 µs",
        "decide p90 µs",
        "explain p50 µs",
        "explain p90 µs",
        "naive p50 µs",
        "speed-up (p50)",
        "< 1 ms",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    notes: list[str] = []
    cases = [alternatives_case(k) for k in range(2, 7)] + [pool_case(n) for n in (1, 10, 100, 1000)]
    for case in cases:
        print("| " + " | ".join(run(case, notes)) + " |", flush=True)
    print()
    for i, note in enumerate(notes, 1):
        print(f"[{i}] {note}")
    print("Requests: t with g0_3, g1_7 (cost 5) and an outsider running; p0 with 4 pool models running.")


if __name__ == "__main__":
    main()
