"""Property tests: the fast solver against the full-expansion oracle on random small matrices.

Matrices are drawn as trees, rendered to DSL strings (random parentheses and spacing,
precedence left to the parser where it gives the same tree) and compiled with
compile_matrix, so the parser and the compiler are exercised too.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swapctl.matrix import MatrixPolicy, Program, compile_matrix
from swapctl.matrix.expand import expand_set, naive_decide
from swapctl.matrix.program import combinations_count

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEWER = settings(SETTINGS, max_examples=100)  # for the properties with little to explore
MAX_COMBINATIONS = 2000  # per set, so that the oracle stays quick
GHOST = "retired-model"  # runs, but is not configured
LONER = "loner"  # configured, named by no set


@dataclass(frozen=True)
class Leaf:
    name: str  # a var or a model ID


@dataclass(frozen=True)
class Ref:
    set_name: str


@dataclass(frozen=True)
class Op:
    op: str  # "and" or "or"
    items: tuple[Tree, ...]


Tree = Leaf | Ref | Op


@dataclass(frozen=True)
class Matrix:
    models: tuple[str, ...]
    variables: dict[str, str]
    costs: dict[str, int]
    sources: dict[str, str]
    trees: dict[str, Tree]

    def compile(self) -> Program:
        return compile_matrix(self.variables, self.costs, self.sources, self.models)

    def expected(self, tree: Tree) -> list[frozenset[str]]:
        """The expansion the tree means, computed without the parser nor the compiler."""
        if isinstance(tree, Leaf):
            return [frozenset((self.variables.get(tree.name, tree.name),))]
        if isinstance(tree, Ref):
            return self.expected(self.trees[tree.set_name])
        parts = [self.expected(item) for item in tree.items]
        if tree.op == "or":
            return [combo for part in parts for combo in part]
        combos: list[frozenset[str]] = [frozenset()]
        for part in parts:
            combos = [combo | pick for combo in combos for pick in part]
        return combos


@st.composite
def trees(draw: st.DrawFn, depth: int, names: tuple[str, ...], refs: tuple[str, ...]) -> Tree:
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        if refs and draw(st.integers(0, 5)) == 0:
            return Ref(draw(st.sampled_from(refs)))
        return Leaf(draw(st.sampled_from(names)))
    op = draw(st.sampled_from(("and", "or")))
    count = draw(st.integers(2, 3))
    return Op(op, tuple(draw(trees(depth - 1, names, refs)) for _ in range(count)))


def render(draw: st.DrawFn, tree: Tree, parent: str | None = None) -> str:
    if isinstance(tree, Leaf):
        text = tree.name
    elif isinstance(tree, Ref):
        text = "+" + tree.set_name
    else:
        symbol = "&" if tree.op == "and" else "|"
        separator = draw(st.sampled_from((f" {symbol} ", symbol, f"  {symbol}\t")))
        text = separator.join(render(draw, item, tree.op) for item in tree.items)
        if parent == "and" and tree.op == "or":
            return f"({text})"
    return f"( {text} )" if draw(st.integers(0, 6)) == 0 else text


def count(matrix_trees: dict[str, Tree], tree: Tree) -> int:
    if isinstance(tree, Leaf):
        return 1
    if isinstance(tree, Ref):
        return count(matrix_trees, matrix_trees[tree.set_name])
    counts = [count(matrix_trees, item) for item in tree.items]
    if tree.op == "or":
        return sum(counts)
    product = 1
    for c in counts:
        product *= c
    return product


@st.composite
def matrices(draw: st.DrawFn) -> Matrix:
    size = draw(st.integers(2, 7))
    models = (*(f"org/m{i}:q4" if i % 2 else f"m{i}" for i in range(size)), LONER)
    variables: dict[str, str] = {}
    for i, model in enumerate(models[:-1]):
        if draw(st.booleans()):
            variables[f"v{i}"] = model
    if draw(st.integers(0, 4)) == 0:  # a var spelled like a model ID wins over that model
        variables[models[0]] = draw(st.sampled_from(models[1:-1]))
    names = tuple(sorted({*models[:-1], *variables} - {LONER}))
    costs: dict[str, int] = {}
    for name in names:
        if draw(st.integers(0, 2)) == 0:
            costs[name] = draw(st.sampled_from((1, 2, 3, 4, 5, 50)))
    sources: dict[str, str] = {}
    set_trees: dict[str, Tree] = {}
    for i in range(draw(st.integers(1, 5))):
        refs = tuple(s for s in set_trees if count(set_trees, set_trees[s]) <= 30)
        tree = draw(trees(3, names, refs).filter(lambda t: count(set_trees, t) <= MAX_COMBINATIONS))
        set_trees[f"s{i}"] = tree
        sources[f"s{i}"] = render(draw, tree)
    return Matrix(models, variables, costs, sources, set_trees)


@st.composite
def situations(draw: st.DrawFn) -> tuple[Matrix, str, list[str]]:
    """A matrix, a requested model that is not running, and what runs."""
    matrix = draw(matrices())
    target = draw(st.sampled_from(matrix.models[:-1]))  # LONER has its own test
    others = [m for m in matrix.models if m != target]
    running = draw(st.lists(st.sampled_from([*others, GHOST]), unique=True, max_size=len(others) + 1))
    return matrix, target, running


def sets_naming(program: Program, model: str) -> list[int]:
    return [i for i in range(len(program.sets)) if any(model in c for c in expand_set(program, i))]


def running_cost(program: Program, names: tuple[str, ...]) -> int:
    return sum(program.costs[program.index[n]] if n in program.index else 1 for n in names)


@SETTINGS
@given(matrices())
def test_parser_and_compiler_keep_the_meaning(matrix: Matrix) -> None:
    program = matrix.compile()
    for i, name in enumerate(matrix.sources):
        assert expand_set(program, i) == matrix.expected(matrix.trees[name]), matrix.sources[name]
        assert combinations_count(program.sets[i].root) == count(matrix.trees, matrix.trees[name])


@SETTINGS
@given(situations())
def test_fast_solver_agrees_with_brute_force(situation: tuple[Matrix, str, list[str]]) -> None:
    matrix, target, running = situation
    program = matrix.compile()
    policy = MatrixPolicy(program)
    plain = policy.decide(target, running)
    for explain in (False, True):
        fast = policy.decide(target, running, explain=explain)
        slow = naive_decide(program, target, running, explain=explain)
        # (a) same cost, same set
        assert (fast.set, fast.cost, fast.already_running) == (slow.set, slow.cost, False)
        # explaining does not change the decision
        assert (fast.set, fast.target_set, fast.evict, fast.cost) == (
            plain.set,
            plain.target_set,
            plain.evict,
            plain.cost,
        )
        # (b) the winner is a real combination of its set, holds the target, and stops the rest
        if fast.set is not None:
            set_index = [s.name for s in program.sets].index(fast.set)
            assert frozenset(fast.target_set) in expand_set(program, set_index)
        else:
            assert fast.target_set == (target,)
        assert target in fast.target_set
        assert fast.target_set == tuple(sorted(fast.target_set))
        assert fast.evict == tuple(sorted(set(running) - set(fast.target_set)))
        assert fast.cost == running_cost(program, fast.evict)


@SETTINGS
@given(situations())
def test_candidates_are_every_set_in_tie_break_order(situation: tuple[Matrix, str, list[str]]) -> None:
    matrix, target, running = situation
    program = matrix.compile()
    decision = MatrixPolicy(program).decide(target, running, explain=True)
    oracle = naive_decide(program, target, running, explain=True)
    naming = sets_naming(program, target)
    order = {s.name: i for i, s in enumerate(program.sets)}
    # (c) one candidate per set that names the target, at that set's brute-force minimum
    assert sorted(order[c.set] for c in decision.candidates) == naming
    assert [(c.set, c.cost) for c in decision.candidates] == [(c.set, c.cost) for c in oracle.candidates]
    keys = [(c.cost, order[c.set]) for c in decision.candidates]
    assert keys == sorted(keys)
    for c in decision.candidates:
        assert target in c.combination
        assert frozenset(c.combination) in expand_set(program, order[c.set])
        assert c.evict == tuple(sorted(set(running) - set(c.combination)))
        assert c.cost == running_cost(program, c.evict)
    if decision.candidates:
        first = decision.candidates[0]
        assert (first.set, first.combination, first.evict, first.cost) == (
            decision.set,
            decision.target_set,
            decision.evict,
            decision.cost,
        )
    else:
        assert decision.set is None


@FEWER
@given(situations())
def test_a_running_target_is_forwarded(situation: tuple[Matrix, str, list[str]]) -> None:
    matrix, target, running = situation
    program = matrix.compile()
    for explain in (False, True):
        # (d) whatever runs beside it, even outside any set
        decision = MatrixPolicy(program).decide(target, [*running, target], explain=explain)
        assert decision.already_running
        assert (decision.evict, decision.cost) == ((), 0)
        assert decision == naive_decide(program, target, [*running, target], explain=explain)


@FEWER
@given(situations())
def test_a_model_in_no_set_runs_alone(situation: tuple[Matrix, str, list[str]]) -> None:
    matrix, _, running = situation
    program = matrix.compile()
    running = [r for r in running if r != LONER]
    for explain in (False, True):
        # (e) everything else is stopped
        decision = MatrixPolicy(program).decide(LONER, running, explain=explain)
        assert (decision.set, decision.target_set, decision.candidates) == (None, (LONER,), ())
        assert decision.evict == tuple(sorted(running))
        assert decision.cost == running_cost(program, decision.evict)


def test_one_hundred_models_in_one_expression() -> None:
    models = [f"m{i}" for i in range(100)] + [f"n{i}" for i in range(80)]
    sets = {
        "wide": "m0 & (" + " | ".join(models[1:100]) + ")",
        "chain": " & ".join(models[100:]),
    }
    program = compile_matrix({}, {"m99": 7}, sets, models)
    policy = MatrixPolicy(program)
    assert combinations_count(program.sets[0].root) == 99
    assert combinations_count(program.sets[1].root) == 1

    decision = policy.decide("m50", ["m0", "m3", "m99"])
    assert (decision.set, decision.target_set, decision.evict, decision.cost) == (
        "wide",
        ("m0", "m50"),
        ("m3", "m99"),
        8,
    )
    decision = policy.decide("m0", ["m77", "n5"])
    assert (decision.set, decision.target_set, decision.evict, decision.cost) == (
        "wide",
        ("m0", "m77"),
        ("n5",),
        1,
    )
    decision = policy.decide("n79", ["n0", "n40", "m98", "m99"], explain=True)
    assert (decision.set, decision.evict, decision.cost) == ("chain", ("m98", "m99"), 8)
    assert decision.target_set == tuple(sorted(models[100:]))
    assert [(c.set, c.cost) for c in decision.candidates] == [("chain", 8)]


def test_a_million_combinations() -> None:
    groups = "abcdef"
    models = ["t", "x"] + [f"{g}{i}" for g in groups for i in range(10)]
    big = "t & " + " & ".join("(" + " | ".join(f"{g}{i}" for i in range(10)) + ")" for g in groups)
    program = compile_matrix({}, {"a5": 50, "x": 3}, {"solo": "t", "big": big}, models)
    policy = MatrixPolicy(program)
    assert combinations_count(program.sets[1].root) == 10**6

    def one_per_group(combination: tuple[str, ...]) -> bool:
        return all(sum(m[0] == g for m in combination) == 1 for g in groups)

    # a3 and a5 exclude each other: keep the dear a5, stop a3 and x (not in the set)
    decision = policy.decide("t", ["a3", "a5", "b7", "c1", "x"], explain=True)
    assert (decision.set, decision.evict, decision.cost) == ("big", ("a3", "x"), 4)
    assert {"t", "a5", "b7", "c1"} <= set(decision.target_set) and one_per_group(decision.target_set)
    assert len(decision.target_set) == 7
    assert [(c.set, c.cost) for c in decision.candidates] == [("big", 4), ("solo", 56)]

    # nothing of the set runs: "solo" and "big" tie at the cost of x, the first defined wins
    decision = policy.decide("t", ["x"])
    assert (decision.set, decision.target_set, decision.evict, decision.cost) == ("solo", ("t",), ("x",), 3)

    # requesting a member: t and one of each other group come along
    decision = policy.decide("f9", ["t", "e2", "e4"])
    assert (decision.set, decision.cost) == ("big", 1)
    assert {"t", "f9"} <= set(decision.target_set) and one_per_group(decision.target_set)
    assert len(decision.evict) == 1 and decision.evict[0] in ("e2", "e4")
