"""`matrix: {fit: gpu}`: the cheapest eviction that lets a model fit, checked against every
subset, and the config that builds it."""

from __future__ import annotations

from itertools import combinations, product
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from swapctl.config import parse_config
from swapctl.errors import ConfigError
from swapctl.matrix import FitPolicy, allowed_part
from swapctl.matrix.fit import Footprint, place
from swapctl.matrix.fit_solver import cheapest_eviction, exhaustive_eviction

GiB = 2**30


def policy(capacities: tuple[int, ...], footprints: dict[str, Footprint], **costs: int) -> FitPolicy:
    every = {**dict.fromkeys(footprints, 1), "cpu": 1, **costs}
    return FitPolicy(every, footprints, capacities)


@st.composite
def problems(draw: st.DrawFn) -> tuple[tuple[int, ...], dict[str, Footprint], dict[str, int], str, list[str]]:
    """GPUs, footprints (some on several GPUs, some pinned), costs with many ties, a target
    that fits alone and up to 9 running models (the oracle tries 2^9 subsets)."""
    capacities = tuple(draw(st.lists(st.sampled_from((6, 10, 12, 24)), min_size=1, max_size=4)))  # equal GPUs
    count = draw(st.integers(2, 10))
    footprints: dict[str, Footprint] = {}
    for i in range(count):
        gpus = draw(st.integers(1, len(capacities)))
        pinned = draw(st.lists(st.integers(0, len(capacities) - 1), unique=True, max_size=gpus))
        vram = draw(st.integers(1, max(capacities)))
        footprints[f"m{i}"] = Footprint(vram, gpus, tuple(sorted(pinned)))
    costs = {name: draw(st.sampled_from((1, 1, 2, 3, 5))) for name in footprints}
    names = list(footprints)
    target = draw(st.sampled_from(names))
    running = draw(st.lists(st.sampled_from([n for n in names if n != target]), unique=True, max_size=9))
    return capacities, footprints, costs, target, running


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_cheapest_eviction_is_the_exhaustive_minimum(
    problem: tuple[tuple[int, ...], dict[str, Footprint], dict[str, int], str, list[str]],
) -> None:
    capacities, footprints, costs, target, running = problem
    assume(place(capacities, {target: footprints[target]}) is not None)
    got, placed = cheapest_eviction(capacities, footprints, costs, target, running)
    expected = exhaustive_eviction(capacities, footprints, costs, target, running)
    assert got == expected  # the same cost, count and names: the tie-break is exact too
    kept = {m: footprints[m] for m in running if m not in got}
    assert place(capacities, {**kept, target: footprints[target]}) is not None
    held = {**kept, target: footprints[target]}
    assert placed is not None and set(placed) == set(held)  # the placement that showed it
    for model, devices in placed.items():
        assert len(set(devices)) == held[model].count and set(held[model].pinned) <= set(devices)
    for index, capacity in enumerate(capacities):
        assert sum(held[m].vram for m, devices in placed.items() if index in devices) <= capacity


@pytest.mark.parametrize(
    ("capacities", "footprints", "costs", "target", "running", "evict"),
    [
        # room left: nothing stops
        ((24,), {"a": Footprint(10, 1), "b": Footprint(10, 1)}, {}, "b", ["a"], ()),
        # the cheapest, not the biggest: two cheap ones beat one dear one
        (
            (32,),
            {"big": Footprint(16, 1), "x": Footprint(8, 1), "y": Footprint(8, 1), "t": Footprint(16, 1)},
            {"big": 5},
            "t",
            ["big", "x", "y"],
            ("x", "y"),
        ),
        # greedy by cost per byte would stop `a` (cost 5); `b` frees enough for less
        ((16,), {"a": Footprint(10, 1), "b": Footprint(6, 1), "t": Footprint(6, 1)}, {"a": 5, "b": 4}, "t",
         ["a", "b"], ("b",)),
        # ties: the fewest models, then the first names
        ((32,), {"a": Footprint(8, 1), "b": Footprint(8, 1), "c": Footprint(16, 1), "t": Footprint(16, 1)},
         {"c": 2}, "t", ["a", "b", "c"], ("c",)),
        ((24,), {"b": Footprint(12, 1), "a": Footprint(12, 1), "t": Footprint(12, 1)}, {}, "t", ["b", "a"], ("a",)),
        # a model on two GPUs needs room on both: the one on the fuller GPU must go
        ((24, 24), {"a": Footprint(18, 1), "b": Footprint(10, 1), "t": Footprint(8, 2)}, {"a": 5}, "t",
         ["a", "b"], ("a",)),
        # pinned: only what holds GPU 1 is in the way, however cheap the other
        ((24, 24), {"a": Footprint(20, 1, (0,)), "b": Footprint(20, 1, (1,)), "t": Footprint(10, 1, (1,))},
         {"b": 9}, "t", ["a", "b"], ("b",)),
        # a model using no GPU is never in the way
        ((24,), {"a": Footprint(20, 1), "t": Footprint(20, 1)}, {"a": 9}, "t", ["a", "cpu"], ("a",)),
    ],
)  # fmt: skip
def test_decisions(
    capacities: tuple[int, ...],
    footprints: dict[str, Footprint],
    costs: dict[str, int],
    target: str,
    running: list[str],
    evict: tuple[str, ...],
) -> None:
    fit = policy(capacities, footprints, **costs)
    decision = fit.decide(target, running, explain=True)
    assert decision.evict == evict
    assert decision.set == "fit"
    assert decision.cost == sum(fit.cost(m) for m in evict)
    assert decision.target_set == tuple(sorted({target, *running} - set(evict)))
    assert [c.evict for c in decision.candidates] == [evict]


def test_already_running_and_unknown_models() -> None:
    fit = policy((24,), {"a": Footprint(10, 1), "t": Footprint(10, 1)})
    assert fit.decide("a", ["a"]).already_running
    decision = fit.decide("t", ["a", "retired", "a"])  # not configured: stopped, as the matrix does
    assert (decision.evict, decision.cost, decision.target_set) == (("retired",), 1, ("a", "t"))


def test_a_model_that_cannot_fit_alone_is_an_error_naming_need_and_capacity() -> None:
    fit = policy((24 * GiB, 24 * GiB), {"huge": Footprint(30 * GiB, 1)})
    with pytest.raises(ConfigError) as caught:
        fit.decide("huge", [])
    assert caught.value.path == "models.huge.vram"
    assert caught.value.message == (
        "huge cannot fit the GPUs even alone: it needs 30 GiB on each of 1 GPU; the GPUs hold 24 GiB, 24 GiB"
    )


def test_allowed_part_keeps_the_costliest_that_fit() -> None:
    fit = policy((24,), {"a": Footprint(16, 1), "b": Footprint(16, 1), "c": Footprint(8, 1)}, b=3)
    assert allowed_part(fit, ["a", "b", "c", "cpu"]) == ("b", "c", "cpu")


def test_tens_of_running_models() -> None:
    """30 models on 8 GPUs, the GPUs nearly full: the exact answer frees enough, no more."""
    footprints = {f"m{i:02}": Footprint((i % 7 + 2) * 3 * GiB, 1 + i % 3 // 2) for i in range(30)}
    footprints["t"] = Footprint(40 * GiB, 2)
    costs = {name: 1 + i % 4 for i, name in enumerate(footprints)}
    capacities = (80 * GiB,) * 8
    running = [m for m in footprints if m != "t"]
    evict, _ = cheapest_eviction(capacities, footprints, costs, "t", running)
    kept = {m: footprints[m] for m in running if m not in evict}
    assert place(capacities, {**kept, "t": footprints["t"]}) is not None
    for m in evict:  # none of the evicted could have stayed
        assert place(capacities, {**kept, m: footprints[m], "t": footprints["t"]}) is None


def config(**matrix: Any) -> dict[str, Any]:
    return {
        "hardware": {"gpus": [{"memory": "24GiB"}, {"memory": "24GiB"}]},
        "models": {
            "a": {"image": "x", "gpus": 1, "vram": "18GiB"},
            "b": {"image": "x", "gpus": ["1"], "vram": "10GiB"},
            "c": {"image": "x", "gpus": 2, "vram": "8GiB"},
            "cpu": {"image": "x"},
        },
        "matrix": {"fit": "gpu", **matrix},
    }


def test_config_builds_the_fit_policy() -> None:
    parsed = parse_config(config(vars={"A": "a"}, evict_costs={"A": 5}), environ={})
    assert isinstance(parsed.policy, FitPolicy)
    assert parsed.policy.summary() == "fit: any models that fit 2 GPUs (48 GiB in all)"
    assert parsed.policy.cost("a") == 5
    assert parsed.policy.footprints["b"] == Footprint(10 * GiB, 1, (1,))
    decision = parsed.policy.decide("c", ["a", "b", "cpu"])
    assert (decision.set, decision.evict, decision.cost) == ("fit", ("a",), 5)


def without(document: dict[str, Any], *path: str) -> dict[str, Any]:
    inner = document
    for key in path[:-1]:
        inner = inner[key]
    del inner[path[-1]]
    return document


@pytest.mark.parametrize(
    ("document", "path", "message"),
    [
        (config(sets={"s": "a"}), "matrix.fit", "not both"),
        (config(fit="cpu"), "matrix.fit", "'gpu'"),
        (without(config(), "hardware"), "matrix.fit", "declare them in `hardware.gpus`"),
        ({**config(), "hardware": {"gpus": []}}, "matrix.fit", "declare them in `hardware.gpus`"),
        (without(config(), "models", "b", "vram"), "models.b.vram", "required with `matrix: {fit: gpu}`"),
        (
            {**config(), "hardware": {"gpus": [{"memory": "24GiB"}]}},
            "models.b.vram",
            "b cannot fit the GPUs even alone: it needs 10 GiB on each of 1 GPU (pinned to GPU 1); "
            "the GPUs hold 24 GiB",
        ),
        (
            {**config(), "hardware": {"gpus": [{"memory": "16GiB"}]}},
            "models.a.vram",
            "a cannot fit the GPUs even alone: it needs 18 GiB on each of 1 GPU; the GPUs hold 16 GiB",
        ),
        (config(evict_costs={"zz": 2}), "matrix.evict_costs.zz", "unknown"),
        ({**config(), "matrix": {"vars": {}}}, "matrix.sets", "required key is missing"),
    ],
)
def test_config_errors_name_the_key_path(document: dict[str, Any], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(document, environ={})
    assert caught.value.path == path
    assert message in caught.value.message


def brute_fits(capacities: tuple[int, ...], footprints: dict[str, Footprint]) -> bool:
    """Every choice of devices for every model, tried."""
    choices = [
        [ds for ds in combinations(range(len(capacities)), f.count) if set(f.pinned) <= set(ds)]
        for f in footprints.values()
    ]
    for chosen in product(*choices):
        used = [0] * len(capacities)
        for f, devices in zip(footprints.values(), chosen, strict=True):
            for d in devices:
                used[d] += f.vram
        if all(u <= c for u, c in zip(used, capacities, strict=True)):
            return True
    return False


@settings(max_examples=400, deadline=None)
@given(problems())
def test_place_matches_every_placement_tried(
    problem: tuple[tuple[int, ...], dict[str, Footprint], dict[str, int], str, list[str]],
) -> None:
    """`place` tells equal GPUs apart only by their free memory: no placement is missed."""
    capacities, footprints, _, _, running = problem
    chosen = {m: footprints[m] for m in running[:6]}
    assert (place(capacities, chosen) is not None) == brute_fits(capacities, chosen)


def test_placed_models_stay_where_their_containers_were_given_gpus() -> None:
    """x and y fit together on one GPU, but their containers run on two: z (a whole GPU)
    needs one of them gone, where a free repacking would say nothing must stop."""
    fits = policy((24 * GiB,) * 2, {m: Footprint(12 * GiB, 1) for m in "xy"} | {"z": Footprint(24 * GiB, 1)})
    assert fits.decide("z", ["x", "y"]).evict == ()
    placed = fits.with_placement({"x": (0,), "y": (1,)})
    assert placed.decide("z", ["x", "y"]).evict == ("x",)
    assert fits.with_placement({"x": (0,), "y": (0,)}).decide("z", ["x", "y"]).evict == ()
    assert placed.with_costs({"x": 5}).decide("z", ["x", "y"]).evict == ("y",)  # both seams at once
