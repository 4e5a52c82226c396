"""PURE: `matrix: {fit: gpu}`, where any models whose footprints fit the GPUs may run together.

A request for model M, with R running, evicts the subset E of R that costs least such that
(R - E) + M fits (`fit.place`, exact); ties go to fewer models, then to the first names.
Models without a footprint hold no GPU and are never in the way; running models the config
does not name are evicted (cost 1), as the matrix does.

The search is a branch and bound. Each model's weight folds the three keys into one integer
(cost, then count, then names: see `_weights`), so one minimum is sought and a branch
whose lower bound reaches the best found is cut. Models are decided most valuable per byte
first, keep before evict; the bound adds to what is evicted already the least a fractional
eviction of the undecided models can pay to free the memory still missing in all (the
knapsack relaxation: GPUs as one pool). A branch stops as soon as all it has not evicted
fits. Placements are memoised by the set of models kept. Exact while the placement
searches stay within DECISION_STEPS; past them, safe but maybe not the cheapest.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from itertools import combinations

from swapctl.errors import ConfigError
from swapctl.matrix.decision import Candidate, Decision
from swapctl.matrix.fit import Footprint, Steps, format_gpu_memory, pinned, place

SET_NAME = "fit"  # the set a decision names, as a matrix decision names its set
# The placement search steps one decision may spend (a step takes microseconds; most
# placements of tens of models take tens). Past them, a set not yet placed counts as not
# fitting: the decision stays quick and safe (it may stop a model more than needed, never
# start one that cannot fit) and is no longer sure to be the cheapest.
DECISION_STEPS = 5_000


@dataclass(frozen=True)
class FitPolicy:
    """Any models that fit `capacities` together may run; `costs` holds every configured
    model's eviction cost, `footprints` those that use a GPU."""

    costs: Mapping[str, int]
    footprints: Mapping[str, Footprint]
    capacities: tuple[int, ...]

    def summary(self) -> str:
        gpus = len(self.capacities)
        total = format_gpu_memory(sum(self.capacities))
        return f"fit: any models that fit {gpus} GPU{'s' * (gpus != 1)} ({total} in all)"

    def cost(self, model: str) -> int:
        return self.costs.get(model, 1)

    def with_costs(self, costs: Mapping[str, int]) -> FitPolicy:
        return replace(self, costs={model: costs.get(model, cost) for model, cost in self.costs.items()})

    def with_placement(self, placed: Mapping[str, tuple[int, ...]]) -> FitPolicy:
        """A container's GPUs are fixed when it starts: a model placed on some keeps them, so
        a decision may not count on moving it to make room (and a sleeping one wakes there)."""
        return replace(self, footprints=pinned(self.footprints, placed))

    def alone_problem(self, model: str) -> str | None:
        """Why `model` cannot run even alone (its need and the GPUs'), or None."""
        footprint = self.footprints.get(model)
        if footprint is None or place(self.capacities, {model: footprint}) is not None:
            return None
        where = f" (pinned to GPU {', '.join(map(str, footprint.pinned))})" if footprint.pinned else ""
        sizes = ", ".join(format_gpu_memory(c) for c in self.capacities) or "none"
        return (
            f"{model} cannot fit the GPUs even alone: it needs {format_gpu_memory(footprint.vram)} "
            f"on each of {footprint.count} GPU{'s' * (footprint.count != 1)}{where}; the GPUs hold {sizes}"
        )

    def decide(self, model: str, running: Collection[str], explain: bool = False) -> Decision:
        running = tuple(dict.fromkeys(running))  # a name given twice is one model
        if model in running:
            return Decision(model, True, None, tuple(sorted(running)), (), 0)
        problem = self.alone_problem(model)
        if problem is not None:
            raise ConfigError(f"models.{model}.vram", problem)
        unknown = [r for r in running if r not in self.costs]
        holding = [r for r in running if r in self.footprints]
        cheapest, placed = cheapest_eviction(self.capacities, self.footprints, self.costs, model, holding)
        evict = sorted({*unknown, *cheapest})
        cost = sum(self.cost(m) for m in evict)
        combination = tuple(sorted({model, *running} - set(evict)))
        candidates = (Candidate(SET_NAME, combination, tuple(evict), cost),) if explain else ()
        devices = placed.get(model) if placed else None
        return Decision(model, False, SET_NAME, combination, tuple(evict), cost, candidates, devices)


def _weights(holding: Sequence[str], costs: Mapping[str, int]) -> dict[str, int]:
    """One integer per model whose sums order sets of models as (cost, count, sorted names)
    do: cost * A + B - 2^(n-1-rank), with B = 2^n above any sum of the last terms and A above
    any sum of the rest. Among sets of one size, the one with the first name of their
    difference has the larger sum of 2^(n-1-rank), so the smaller weight."""
    n = len(holding)
    unit = 1 << n
    scale = (n + 1) * unit
    return {m: costs[m] * scale + unit - (1 << (n - 1 - rank)) for rank, m in enumerate(sorted(holding))}


def cheapest_eviction(
    capacities: Sequence[int],
    footprints: Mapping[str, Footprint],
    costs: Mapping[str, int],
    model: str,
    running: Collection[str],
) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]] | None]:
    """The models of `running` (each with a footprint) to evict so that the rest and `model`
    fit `capacities`, at the least cost, then the fewest, then the first names; sorted. With
    them, the placement that showed the rest and `model` fit (None where `model` uses no GPU
    and nothing is kept). `model` must fit alone."""
    weight = _weights(tuple(running), costs)
    mine = footprints.get(model)
    memory = {m: footprints[m].vram * footprints[m].count for m in running}
    # the most valuable per byte first: they are kept first, the bound frees the rest
    order = sorted(running, key=lambda m: (-Fraction(weight[m], memory[m]), m))
    n = len(order)
    capacity = sum(capacities) - (mine.vram * mine.count if mine else 0)
    rest_memory = [sum(memory[m] for m in order[i:]) for i in range(n + 1)]
    known: dict[frozenset[str], dict[str, tuple[int, ...]] | None] = {}  # kept -> a placement
    steps = Steps(DECISION_STEPS)

    def fits(kept: frozenset[str]) -> bool:
        if not kept:
            return True  # `model` alone, whatever steps are left
        if kept not in known:
            held = {m: footprints[m] for m in sorted(kept)}
            if mine is not None:
                held[model] = mine
            known[kept] = place(capacities, held, steps)
        return known[kept] is not None

    def bound(i: int, missing: int) -> int | None:
        """The least the models from `i` on can pay, evicted in part, to free `missing`
        bytes; None when all of them cannot."""
        paid = 0
        for m in reversed(order[i:]):  # the cheapest per byte first
            if missing <= 0:
                return paid
            share = min(missing, memory[m])
            paid += weight[m] * share // memory[m]
            missing -= share
        return paid if missing <= 0 else None

    best_weight = sum(weight.values()) + 1
    best: tuple[str, ...] = tuple(order)

    def search(i: int, kept: frozenset[str], kept_memory: int, evicted: tuple[str, ...], paid: int) -> None:
        nonlocal best_weight, best
        missing = kept_memory + rest_memory[i] - capacity
        more = bound(i, missing)
        if more is None or paid + more >= best_weight:
            return
        if missing <= 0 and fits(kept.union(order[i:])):
            best_weight, best = paid, evicted
            return
        m = order[i]  # i < n: with nothing left, `kept` fits
        if kept_memory + memory[m] <= capacity and fits(kept | {m}):
            search(i + 1, kept | {m}, kept_memory + memory[m], evicted, paid)
        search(i + 1, kept, kept_memory, (*evicted, m), paid + weight[m])

    search(0, frozenset(), 0, (), 0)
    kept = frozenset(running).difference(best)
    alone = place(capacities, {model: mine}) if mine is not None else None
    return tuple(sorted(best)), known.get(kept) if kept else alone


def exhaustive_eviction(
    capacities: Sequence[int],
    footprints: Mapping[str, Footprint],
    costs: Mapping[str, int],
    model: str,
    running: Collection[str],
) -> tuple[str, ...]:
    """`cheapest_eviction` by trying every subset of `running`, the smallest first, up to
    the size past which none can cost less (costs are at least 1): the oracle of the tests
    and the baseline of the benchmark (up to 2^n placements)."""
    holding = sorted(running)
    mine = {model: footprints[model]} if model in footprints else {}
    best: tuple[int, int, tuple[str, ...]] | None = None
    for size in range(len(holding) + 1):
        if best is not None and best[0] < size:
            break  # every cost is at least 1: no larger set can cost less
        for evict in combinations(holding, size):
            key = (sum(costs[m] for m in evict), size, evict)
            if best is not None and key >= best:
                continue
            kept = {m: footprints[m] for m in holding if m not in evict}
            if place(capacities, {**kept, **mine}) is not None:
                best = key
    assert best is not None, "the model must fit alone"
    return best[2]
