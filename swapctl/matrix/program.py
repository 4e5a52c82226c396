"""Compile the `matrix:` block into a Program: set expressions as trees over model indices.

Sets and evict_costs name models by var or model ID, vars by model ID (aliases are the
clients' names; `swapctl.names` resolves every name); `+ref` inlines another set's tree,
and every error names its key path.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from swapctl.errors import ConfigError
from swapctl.matrix import dsl
from swapctl.names import Kind, Names

VAR_NAME = re.compile(r"[A-Za-z0-9._-]{1,32}")
MAX_COST = 10**9
# A set's compiled tree is walked recursively by the solver (one or two frames a level), so
# its depth is bounded well inside Python's stack; nobody writes 200 alternating levels.
MAX_DEPTH = 200
# A set that reuses sets (`+s & +s`, again and again) can name exponentially many models
# once inlined; this bounds the tree the solver and `combinations_count` walk.
MAX_NAMES = 100_000
SET_NAMES = Kind.VAR | Kind.ID  # what sets and evict_costs name models by (once: a Flag's | is slow)
AUTO: Literal["auto"] = "auto"  # an evict_costs value: the cost is measured (see swapctl.measures)
CostRule = int | Literal["auto"]  # what evict_costs says of one model
EvictCosts = Literal["auto"] | Mapping[str, object]  # `matrix.evict_costs` as written


@dataclass(frozen=True, eq=False)
class Node:
    """A compiled expression. `mask` has bit i set when model i appears below this node;
    `depth` counts its levels of and/or (0 for a model), `names` its models with repeats."""

    op: str  # "model", "and" or "or"
    mask: int
    model: int = -1
    children: tuple[Node, ...] = ()
    depth: int = 0
    names: int = 1


@dataclass(frozen=True)
class MatrixSet:
    name: str
    root: Node


@dataclass(frozen=True)
class Program:
    models: tuple[str, ...]
    costs: tuple[int, ...]
    sets: tuple[MatrixSet, ...]
    sets_by_model: tuple[tuple[int, ...], ...]
    index: Mapping[str, int] = field(repr=False)


def bits(mask: int) -> list[int]:
    """The indices of the set bits of `mask`, lowest first."""
    found = []
    while mask:
        low = mask & -mask
        found.append(low.bit_length() - 1)
        mask ^= low
    return found


def combinations_count(node: Node) -> int:
    """How many combinations the expression describes, counted without expanding them."""
    if node.op == "model":
        return 1
    counts = [combinations_count(child) for child in node.children]
    if node.op == "or":
        return sum(counts)
    product = 1
    for count in counts:
        product *= count
    return product


class _TooLarge(ValueError):
    """A tree past MAX_NAMES, raised before it is built."""


def _join(op: str, children: list[Node]) -> Node:
    names = sum(child.names for child in children)
    if names > MAX_NAMES:
        raise _TooLarge(f"names {names} models once its +refs are inlined; at most {MAX_NAMES}")
    flat: list[Node] = []
    for child in children:
        flat.extend(child.children if child.op == op else (child,))
    if len(flat) == 1:
        return flat[0]
    mask = 0
    for child in flat:
        mask |= child.mask
    depth = 1 + max(child.depth for child in flat)
    return Node(op, mask, children=tuple(flat), depth=depth, names=names)


class _Compiler:
    def __init__(
        self,
        path: str,
        sources: Mapping[str, str],
        names: Names,
        index: Mapping[str, int],
        leaves: tuple[Node, ...],
    ) -> None:
        self.path = path
        self.sources = sources
        self.names = names
        self.index = index
        self.leaves = leaves
        self.done: dict[str, Node] = {}
        self.visiting: list[str] = []

    def compile_set(self, name: str) -> Node:
        """The set's tree. The sets it references are compiled first, depth first, from an
        explicit stack (a chain of +refs may be long); errors come in the order of the text."""
        if name in self.done:
            return self.done[name]
        stack: list[tuple[str, dsl.Expr, Iterator[dsl.Name | dsl.Ref]]] = []
        entering: str | None = name
        while entering is not None or stack:
            if entering is not None:
                if entering in self.visiting:
                    cycle = " -> ".join([*self.visiting[self.visiting.index(entering) :], entering])
                    raise ConfigError(f"{self.path}.sets.{self.visiting[-1]}", f"reference cycle: {cycle}")
                tree = self.parse(entering)
                self.visiting.append(entering)
                stack.append((entering, tree, dsl.leaves(tree)))
                entering = None
            current, tree, pending = stack[-1]
            entering = self.next_ref(current, pending)
            if entering is None:
                stack.pop()
                self.visiting.pop()
                self.done[current] = self.lower_set(current, tree)
        return self.done[name]

    def parse(self, name: str) -> dsl.Expr:
        source = self.sources[name]
        where = f"{self.path}.sets.{name}"
        if not isinstance(source, str):
            raise ConfigError(where, f'must be a DSL string such as "a & (b | c)", got {source!r}')
        try:
            tree = dsl.parse(source)
        except dsl.DslError as error:
            raise ConfigError(where, f"{error} in {source!r}") from None
        if (levels := dsl.depth(tree)) > MAX_DEPTH:
            raise ConfigError(where, f"nested {levels} levels deep; at most {MAX_DEPTH}")
        return tree

    def next_ref(self, name: str, pending: Iterator[dsl.Name | dsl.Ref]) -> str | None:
        """The next set `name` references that is still to compile; names on the way must resolve."""
        where, source = f"{self.path}.sets.{name}", self.sources[name]
        for leaf in pending:
            if isinstance(leaf, dsl.Name):
                self.resolve(leaf, where, source)
            elif leaf.set_name not in self.sources:
                raise ConfigError(
                    where, f"unknown set '+{leaf.set_name}' at position {leaf.position} in {source!r}"
                )
            elif leaf.set_name not in self.done:
                return leaf.set_name
        return None

    def lower_set(self, name: str, tree: dsl.Expr) -> Node:
        where = f"{self.path}.sets.{name}"
        try:
            node = self.lower(tree, where, self.sources[name])
        except _TooLarge as error:
            raise ConfigError(where, str(error)) from None
        if node.depth > MAX_DEPTH:
            raise ConfigError(
                where, f"nested {node.depth} levels deep through its +refs; at most {MAX_DEPTH}"
            )
        return node

    def lower(self, expr: dsl.Expr, where: str, source: str) -> Node:
        """Recursive, but `parse` bounded the depth; every +ref it meets is compiled already."""
        if isinstance(expr, dsl.Name):
            return self.leaves[self.resolve(expr, where, source)]
        if isinstance(expr, dsl.Ref):
            return self.done[expr.set_name]
        op = "and" if isinstance(expr, dsl.All) else "or"
        return _join(op, [self.lower(item, where, source) for item in expr.items])

    def resolve(self, name: dsl.Name, where: str, source: str) -> int:
        text = (name.position, source)
        return self.index[self.names.resolve(name.text, SET_NAMES, where=where, text=text)]


def matrix_names(variables: Mapping[str, str], names: Names, path: str = "matrix") -> Names:
    """`names` with the matrix's vars added, each a valid var name for a model ID."""
    resolved: dict[str, str] = {}
    for var, target in variables.items():
        where = f"{path}.vars.{var}"
        if not isinstance(var, str) or not VAR_NAME.fullmatch(var):
            raise ConfigError(where, "a var name is 1-32 letters, digits, '-', '.' or '_'")
        resolved[var] = names.resolve(target, Kind.ID, where=where)
    return replace(names, vars=resolved)


def compile_matrix(
    variables: Mapping[str, str],
    evict_costs: EvictCosts,
    sets: Mapping[str, str],
    models: Collection[str],
    aliases: Mapping[str, str] | None = None,
    path: str = "matrix",
) -> Program:
    """Build a Program from the `matrix:` block's parts; `models` are the configured model
    IDs, `aliases` maps alias -> ID. The config calls `compile_program` with its own names."""
    names = matrix_names(variables, Names(frozenset(models), aliases or {}), path)
    return compile_program(names, tuple(models), evict_costs, sets, path)


def compile_cost_rules(
    names: Names, models: tuple[str, ...], evict_costs: EvictCosts, path: str = "matrix"
) -> dict[str, CostRule]:
    """What `evict_costs` says of each model it names, by model ID: a cost, or `auto` (a cost
    measured while swapctl runs). `auto` alone says it of every model."""
    if evict_costs == AUTO:
        return dict.fromkeys(models, AUTO)
    if not isinstance(evict_costs, Mapping):
        expected = "expected 'auto' or a map of models to costs"
        raise ConfigError(f"{path}.evict_costs", f"{expected}, got {evict_costs!r}")
    rules: dict[str, CostRule] = {}
    for name, cost in evict_costs.items():
        where = f"{path}.evict_costs.{name}"
        named = names.resolve(name, SET_NAMES, where=where)
        if cost == AUTO:
            rules[named] = AUTO
            continue
        if isinstance(cost, bool) or not isinstance(cost, int):
            raise ConfigError(where, f"a cost is a positive integer or 'auto', got {cost!r}")
        if cost <= 0:
            raise ConfigError(where, f"a cost is a positive integer, got {cost!r}")
        if cost > MAX_COST:
            raise ConfigError(where, f"a cost is at most {MAX_COST}, got {cost!r}")
        rules[named] = cost
    return rules


def compile_costs(
    names: Names, models: tuple[str, ...], evict_costs: EvictCosts, path: str = "matrix"
) -> dict[str, int]:
    """Each model's eviction cost: its `evict_costs` entry (by var or model ID), else 1. An
    `auto` model costs 1 until measured: the swapper gives its policy the measured costs
    (`Policy.with_costs`)."""
    costs = dict.fromkeys(models, 1)
    for model, rule in compile_cost_rules(names, models, evict_costs, path).items():
        costs[model] = rule if isinstance(rule, int) else 1
    return costs


def compile_program(
    names: Names,
    models: tuple[str, ...],
    evict_costs: EvictCosts,
    sets: Mapping[str, str],
    path: str = "matrix",
) -> Program:
    """Build a Program over `models` (in their configured order), naming them by `names`."""
    index = {model: i for i, model in enumerate(models)}
    by_name = compile_costs(names, models, evict_costs, path)
    costs = [by_name[model] for model in models]

    if not sets:
        raise ConfigError(f"{path}.sets", "no sets: the matrix needs at least one set")
    leaves = tuple(Node("model", 1 << i, model=i) for i in range(len(models)))
    compiler = _Compiler(path, sets, names, index, leaves)
    compiled = tuple(MatrixSet(name, compiler.compile_set(name)) for name in sets)

    by_model: list[list[int]] = [[] for _ in models]
    for set_index, matrix_set in enumerate(compiled):
        for model in bits(matrix_set.root.mask):
            by_model[model].append(set_index)
    return Program(
        models=models,
        costs=tuple(costs),
        sets=compiled,
        sets_by_model=tuple(tuple(s) for s in by_model),
        index=index,
    )
