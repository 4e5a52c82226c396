"""Table tests: (matrix, running, request) -> decision, and the matrix's configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from swapctl.config import load_config
from swapctl.errors import ConfigError
from swapctl.matrix import GroupPolicy, MatrixPolicy, compile_matrix
from swapctl.matrix.groups import Group

SEED = load_config(Path(__file__).parents[1] / "configs" / "seed.yaml")
VARS = dict(SEED.vars)


def ids(names: str) -> list[str]:
    return [VARS.get(n, n) for n in names.split()]


@pytest.mark.parametrize(
    ("request_for", "running", "chosen", "target_set", "evict", "cost"),
    [
        ("g", "", "standard", "g v", "", 0),
        ("g", "q v", "standard", "g v", "q", 1),
        ("sd", "g v", "creative", "g sd", "v", 50),
        ("sd", "q", "creative", "q sd", "", 0),
        ("L", "g v", "full", "L", "g v", 51),
        ("e", "m v", "with_rerank", "g e v", "m", 1),
        ("e", "q v", "with_rerank", "q e v", "", 0),
        ("v", "L", "standard", "g v", "L", 30),
        ("m", "g sd", "standard", "m v", "g sd", 2),
        ("loner", "L g", None, "loner", "L g", 31),
        ("loner", "", None, "loner", "", 0),
    ],
)
def test_seed_decisions(
    request_for: str, running: str, chosen: str | None, target_set: str, evict: str, cost: int
) -> None:
    decision = SEED.policy.decide(ids(request_for)[0], ids(running))
    assert (decision.set, decision.target_set, decision.evict, decision.cost) == (
        chosen,
        tuple(sorted(ids(target_set))),
        tuple(sorted(ids(evict))),
        cost,
    )
    assert not decision.already_running


def test_running_target_is_forwarded_even_outside_any_set() -> None:
    decision = SEED.policy.decide("gemma-model", ["gemma-model", "llama-70B", "stable-diffusion"])
    assert decision.already_running
    assert decision.evict == () and decision.cost == 0


def test_candidates_come_in_tie_break_order() -> None:
    decision = SEED.policy.decide("gemma-model", ids("q v"), explain=True)
    assert [(c.set, c.cost) for c in decision.candidates] == [
        ("standard", 1),
        ("with_rerank", 1),
        ("creative", 51),
    ]
    assert decision.candidates[0].evict == decision.evict


def policy(
    sets: dict[str, str], costs: dict[str, int] | None = None, models: str = "a b c d"
) -> MatrixPolicy:
    return MatrixPolicy(compile_matrix({}, costs or {}, sets, models.split()))


def test_ties_go_to_the_set_defined_first() -> None:
    assert policy({"one": "a & b", "two": "a & c"}).decide("a", ["b", "c"]).set == "one"
    assert policy({"two": "a & c", "one": "a & b"}).decide("a", ["b", "c"]).set == "two"


def test_costs_beat_definition_order() -> None:
    decision = policy({"one": "a & b", "two": "a & c"}, {"c": 5}).decide("a", ["b", "c"])
    assert (decision.set, decision.evict, decision.cost) == ("two", ("b",), 1)


def test_refs_inline_and_var_wins_over_model_id() -> None:
    program = compile_matrix({"b": "c"}, {}, {"llms": "a | b", "s": "+llms & d"}, ["a", "b", "c", "d"])
    decision = MatrixPolicy(program).decide("c", ["d", "b"])
    # the var `b` names model c, so model b is in no set and must go
    assert (decision.set, decision.target_set, decision.evict) == ("s", ("c", "d"), ("b",))
    assert MatrixPolicy(program).decide("b", ["c"]).set is None


def test_duplicate_names_in_one_combination() -> None:
    decision = policy({"s": "a & a & b"}).decide("a", ["b"])
    assert decision.target_set == ("a", "b") and decision.evict == ()


def test_unknown_running_models_are_always_evicted() -> None:
    decision = policy({"s": "a & b"}).decide("a", ["b", "retired-model"])
    assert decision.evict == ("retired-model",) and decision.cost == 1


def test_many_models_in_one_expression() -> None:
    models = [f"m{i}" for i in range(120)]
    program = compile_matrix({}, {}, {"wide": " & ".join(models), "alt": " | ".join(models)}, models)
    decision = MatrixPolicy(program).decide("m100", ["m3", "m99"])
    assert decision.set == "wide" and decision.evict == () and len(decision.target_set) == 120


@pytest.mark.parametrize(
    ("variables", "costs", "sets", "path", "message"),
    [
        ({}, {}, {}, "matrix.sets", "no sets"),
        ({}, {}, {"s": "a & x"}, "matrix.sets.s", "unknown name 'x' at position 5"),
        ({}, {}, {"s": "a & +nope"}, "matrix.sets.s", "unknown set '+nope' at position 5"),
        ({}, {}, {"s": "a & (b"}, "matrix.sets.s", "'(' is never closed at position 5"),
        ({}, {}, {"s": "a ^ b"}, "matrix.sets.s", "unexpected character '^' at position 3"),
        ({}, {}, {"s": ""}, "matrix.sets.s", "empty expression"),
        ({}, {}, {"s": "a | +t", "t": "+s"}, "matrix.sets.t", "reference cycle: s -> t -> s"),
        ({}, {}, {"s": "+s"}, "matrix.sets.s", "reference cycle: s -> s"),
        (
            {},
            {},
            {"s": "alias-a"},
            "matrix.sets.s",
            "'alias-a' at position 1 in 'alias-a' is an alias of model 'a'",
        ),
        ({"x": "nope"}, {}, {"s": "a"}, "matrix.vars.x", "unknown model 'nope'"),
        ({"x": "alias-a"}, {}, {"s": "a"}, "matrix.vars.x", "'alias-a' is an alias of model 'a'"),
        ({"bad name": "a"}, {}, {"s": "a"}, "matrix.vars.bad name", "a var name is 1-32"),
        ({"x" * 33: "a"}, {}, {"s": "a"}, f"matrix.vars.{'x' * 33}", "a var name is 1-32"),
        ({}, {"a": 0}, {"s": "a"}, "matrix.evict_costs.a", "a cost is a positive integer, got 0"),
        ({}, {"a": -3}, {"s": "a"}, "matrix.evict_costs.a", "a cost is a positive integer, got -3"),
        ({}, {"zz": 3}, {"s": "a"}, "matrix.evict_costs.zz", "unknown name 'zz'"),
    ],
)
def test_configuration_errors(
    variables: dict[str, str], costs: dict[str, int], sets: dict[str, str], path: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        compile_matrix(variables, costs, sets, ["a", "b"], {"alias-a": "a"})
    assert caught.value.path == path
    assert message in caught.value.message


GROUPS = GroupPolicy(
    (
        Group("llms", ("a", "b"), swap=True, exclusive=True),
        Group("tools", ("c", "d"), swap=False, exclusive=False),
        Group("always", ("e",), swap=True, exclusive=False, persistent=True),
    ),
    ("a", "b", "c", "d", "e", "f", "g"),
)


@pytest.mark.parametrize(
    ("request_for", "running", "group", "evict"),
    [
        ("a", "", "llms", ""),
        ("a", "b", "llms", "b"),
        ("a", "c d e", "llms", "c d"),
        ("c", "a d e", "tools", ""),
        ("e", "a c", "always", ""),
        ("f", "g", "(default)", "g"),
        ("f", "a c e", "(default)", "a c"),
        ("a", "f", "llms", "f"),
    ],
)
def test_groups(request_for: str, running: str, group: str, evict: str) -> None:
    decision = GROUPS.decide(request_for, running.split(), explain=True)
    assert (decision.set, decision.evict, decision.cost) == (group, tuple(evict.split()), len(evict.split()))
    assert decision.target_set == tuple(sorted({request_for, *running.split()} - set(evict.split())))
    assert decision.candidates[0].set == group


def test_no_groups_means_one_model_at_a_time() -> None:
    decision = GroupPolicy((), ("a", "b", "c")).decide("a", ["b", "c"])
    assert decision.evict == ("b", "c") and decision.set == "(default)"
