"""The matrix semantics by full expansion: exponential on purpose.

This module is the oracle for the property tests and the baseline for the benchmarks;
nothing uses it at run time (see solver.py for the real solver).

Expansion of a compiled Node: a "model" is the one combination of that model, an "or"
is the concatenation of its children's combinations, an "and" is the union of one pick
from each child, in Cartesian order (the first child varies slowest). Duplicates are
kept: `a | a` expands to two combinations `{a}`; they never change a decision, since the
first of equal combinations is met first. A combination is a frozenset, so `a & a` is `{a}`.
"""

from __future__ import annotations

from collections.abc import Collection

from swapctl.matrix.decision import Candidate, Decision
from swapctl.matrix.program import Node, Program


def expand(node: Node) -> list[frozenset[int]]:
    """Every combination (as model indices) that `node` describes, in expansion order."""
    if node.op == "model":
        return [frozenset((node.model,))]
    if node.op == "or":
        return [combo for child in node.children for combo in expand(child)]
    combos: list[frozenset[int]] = [frozenset()]
    for child in node.children:
        picks = expand(child)
        combos = [combo | pick for combo in combos for pick in picks]
    return combos


def expand_set(program: Program, set_index: int) -> list[frozenset[str]]:
    """Every combination of one set, as model IDs, in expansion order."""
    return [frozenset(program.models[m] for m in combo) for combo in expand(program.sets[set_index].root)]


def naive_decide(program: Program, model: str, running: Collection[str], explain: bool = False) -> Decision:
    """The Decision MatrixPolicy.decide must reach, found by trying every combination.

    Within one set the first combination (in expansion order) of minimum cost wins;
    across sets the cheapest wins, ties to the set defined first.
    """
    if model in running:
        return Decision(model, True, None, tuple(sorted(running)), (), 0)

    def cost_of(combo: frozenset[str]) -> int:
        return sum(program.costs[program.index[r]] if r in program.index else 1 for r in evicted(combo))

    def evicted(combo: frozenset[str]) -> tuple[str, ...]:
        return tuple(sorted(r for r in running if r not in combo))

    candidates: list[Candidate] = []
    for set_index, matrix_set in enumerate(program.sets):
        best: tuple[int, frozenset[str]] | None = None
        for combo in expand_set(program, set_index):
            if model in combo and (best is None or cost_of(combo) < best[0]):
                best = (cost_of(combo), combo)
        if best is not None:
            cost, combo = best
            candidates.append(Candidate(matrix_set.name, tuple(sorted(combo)), evicted(combo), cost))
    if not candidates:
        alone = frozenset((model,))
        return Decision(model, False, None, (model,), evicted(alone), cost_of(alone))
    candidates.sort(key=lambda c: c.cost)  # stable: equal costs keep definition order
    win = candidates[0]
    shown = tuple(candidates) if explain else ()
    return Decision(model, False, win.set, win.combination, win.evict, win.cost, shown)
