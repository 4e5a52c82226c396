"""Solve one request against a compiled matrix without expanding the Cartesian product.

Every expression is projected onto the few models that matter to this decision (the
target and what runs). A projected state is a bitmask over those models; each node keeps
only its maximal states, since costs are positive and a state that keeps more running
models never costs more. Each state remembers how it was made, so the winner can be
turned back into one real combination of its set.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from swapctl.matrix.decision import Candidate, Decision
from swapctl.matrix.program import Node, Program, combinations_count

# How a state was made: an "or" names the child and its state, an "and" its children's states.
Origin = tuple[int, ...]
States = dict[int, Origin]


def _maximal(states: States) -> States:
    if len(states) < 2:
        return states
    ordered = sorted(states, key=lambda mask: -mask.bit_count())
    kept: list[int] = []
    for mask in ordered:
        if not any(mask & other == mask for other in kept):
            kept.append(mask)
    keep = set(kept)
    return {mask: origin for mask, origin in states.items() if mask in keep}


class _Projection:
    """States of each node, projected onto the relevant models of one decision."""

    def __init__(self, local: dict[int, int]) -> None:
        self.local = local  # global model index -> local bit
        self.relevant = 0
        for model in local:
            self.relevant |= 1 << model
        self.memo: dict[int, States] = {}

    def states(self, node: Node) -> States:
        if not node.mask & self.relevant:
            return {0: ()}
        known = self.memo.get(id(node))
        if known is not None:
            return known
        if node.op == "model":
            found: States = {self.local[node.model]: ()}
        elif node.op == "or":
            found = {}
            for i, child in enumerate(node.children):
                if not child.mask & self.relevant:  # the common case, without a call
                    found.setdefault(0, (i, 0))
                    continue
                for mask in self.states(child):
                    found.setdefault(mask, (i, mask))
            found = _maximal(found)
        else:
            found = {0: ()}
            for child in node.children:
                if not child.mask & self.relevant:  # the common case, without a call
                    found = {mask: (*parts, 0) for mask, parts in found.items()}
                    continue
                grown: States = {}
                for mask, parts in found.items():
                    for child_mask in self.states(child):
                        grown.setdefault(mask | child_mask, (*parts, child_mask))
                found = _maximal(grown)
        self.memo[id(node)] = found
        return found

    def witness(self, node: Node, mask: int) -> list[int]:
        """One real combination under `node` whose projection is `mask`."""
        if node.op == "model":
            return [node.model]
        origin = self.states(node)[mask]
        if node.op == "or":
            child, child_mask = origin or (0, 0)
            return self.witness(node.children[child], child_mask)
        parts = origin or (0,) * len(node.children)
        return [
            m for child, part in zip(node.children, parts, strict=True) for m in self.witness(child, part)
        ]


def _count(number: int) -> str:
    """A count as digits, or its order of magnitude past 10^15 (Python refuses to print
    integers of more than 4300 digits, and nobody reads 16)."""
    return str(number) if number < 10**15 else f"about 10^{int(math.log10(number))}"


@dataclass(frozen=True)
class MatrixPolicy:
    program: Program

    def summary(self) -> str:
        total = sum(combinations_count(s.root) for s in self.program.sets)
        return f"matrix with {len(self.program.sets)} sets ({_count(total)} combinations)"

    def cost(self, model: str) -> int:
        return self.program.costs[self.program.index[model]]

    def with_costs(self, costs: Mapping[str, int]) -> MatrixPolicy:
        """The program's costs are its only part that depends on them (the sets' trees do not)."""
        program = self.program
        updated = zip(program.models, program.costs, strict=True)
        return MatrixPolicy(replace(program, costs=tuple(costs.get(m, cost) for m, cost in updated)))

    def with_placement(self, placed: Mapping[str, tuple[int, ...]]) -> MatrixPolicy:
        """The sets say what runs together, whatever the GPUs."""
        return self

    def decide(self, model: str, running: Collection[str], explain: bool = False) -> Decision:
        program = self.program
        running = tuple(dict.fromkeys(running))  # a name given twice is one model
        if model in running:
            return Decision(model, True, None, tuple(sorted(running)), (), 0)
        target = program.index[model]
        known = [program.index[r] for r in running if r in program.index]
        unknown_cost = sum(1 for r in running if r not in program.index)
        candidate_sets = program.sets_by_model[target]
        if not candidate_sets:
            evict = tuple(sorted(running))
            cost = unknown_cost + sum(program.costs[r] for r in known)
            return Decision(model, False, None, (model,), evict, cost)

        local = {m: 1 << i for i, m in enumerate([target, *known])}
        projection = _Projection(local)
        weights = {local[m]: program.costs[m] for m in known}

        def evaluate(set_index: int) -> tuple[int, int]:
            """The cheapest state of this set that holds the target: (cost, mask)."""
            best: tuple[int, int] | None = None
            for mask in projection.states(program.sets[set_index].root):
                if mask & 1:
                    cost = sum(w for bit, w in weights.items() if not mask & bit)
                    if best is None or cost < best[0]:
                        best = (cost, mask)
            assert best is not None, "a set that names the target has a state holding it"
            return best

        def lower_bound(set_index: int) -> int:
            mask = program.sets[set_index].root.mask
            return sum(program.costs[m] for m in known if not mask >> m & 1)

        results: dict[int, tuple[int, int]] = {}
        if explain:
            results = {s: evaluate(s) for s in candidate_sets}
        else:
            best: tuple[int, int] | None = None  # (cost, set index)
            for bound, set_index in sorted((lower_bound(s), s) for s in candidate_sets):
                if best is not None and (bound, set_index) >= best:
                    break
                results[set_index] = evaluate(set_index)
                best = min(best or (results[set_index][0], set_index), (results[set_index][0], set_index))

        def candidate(set_index: int) -> Candidate:
            cost, mask = results[set_index]
            root = program.sets[set_index].root
            combination = {program.models[m] for m in projection.witness(root, mask)}
            evict = tuple(sorted(r for r in running if r not in combination))
            return Candidate(
                program.sets[set_index].name, tuple(sorted(combination)), evict, cost + unknown_cost
            )

        ranked = sorted(results, key=lambda s: (results[s][0], s))
        winner = candidate(ranked[0])
        candidates = tuple(candidate(s) for s in ranked) if explain else ()
        return Decision(model, False, winner.set, winner.combination, winner.evict, winner.cost, candidates)
