"""Kept measurements (the store and its file) and the costs `evict_costs: auto` makes of them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from swapctl.config import Config, parse_config
from swapctl.config.hardware import footprint_notes
from swapctl.errors import ConfigError
from swapctl.matrix import FitPolicy, GroupPolicy
from swapctl.matrix.fit import Footprint
from swapctl.measures import (
    KEPT,
    Cost,
    MeasureStore,
    auto_cost,
    costed_policy,
    effective_costs,
    kept_footprints,
    measures_path,
)
from swapctl.spec import build_spec

GIB = 2**30


def config(evict_costs: object = "auto", **models: dict[str, Any]) -> Config:
    written = {name: {"image": "img"} for name in ("chat", "code", "new")}
    for name, keys in models.items():
        written[name] = {**written[name], **keys}
    sets = {"with_chat": "new & chat", "with_code": "new & code", "old": "chat & code"}
    matrix = {"vars": {"c": "chat"}, "sets": sets, "evict_costs": evict_costs}
    return parse_config({"models": written, "matrix": matrix, "instance": "test"}, environ={})


def spec_hash(config: Config, model: str) -> str:
    return build_spec(config, model).spec_hash


# --- the store ---------------------------------------------------------------------------------


def test_what_is_recorded_comes_back_from_the_file(tmp_path: Path) -> None:
    path = measures_path(tmp_path, "test")
    store = MeasureStore(path)
    store.record_start("chat", "h1", 12.5)
    store.record_start("chat", "h1", 11.0)
    store.record_wake("chat", "h1", 0.8)
    store.record_footprint("chat", "h1", [(1, 3 * GIB), (0, 5 * GIB)])
    store.record_start("code", "h2", 4.0)
    loaded = MeasureStore.load(path)
    assert loaded.kept == store.kept
    chat = loaded.get("chat", "h1")
    assert chat is not None
    assert (chat.starts, chat.wakes, chat.footprint) == ((12.5, 11.0), (0.8,), ((0, 5 * GIB), (1, 3 * GIB)))
    assert loaded.get("chat", "another hash") is None
    assert json.loads(path.read_text())["version"] == 1


def test_another_spec_hash_resets_that_model_only(tmp_path: Path) -> None:
    store = MeasureStore(measures_path(tmp_path, "test"))
    store.record_start("chat", "old", 30.0)
    store.record_footprint("chat", "old", [(0, GIB)])
    store.record_start("code", "same", 5.0)
    store.record_start("chat", "new", 3.0)
    assert store.get("chat", "old") is None
    chat = store.get("chat", "new")
    assert chat is not None and (chat.starts, chat.footprint) == ((3.0,), ())
    code = store.get("code", "same")
    assert code is not None and code.starts == (5.0,)


def test_only_the_last_durations_are_kept() -> None:
    store = MeasureStore()
    for second in range(KEPT + 5):
        store.record_start("chat", "h", float(second))
        store.record_wake("chat", "h", float(second))
    kept = store.get("chat", "h")
    assert kept is not None
    assert kept.starts == kept.wakes == tuple(float(s) for s in range(5, KEPT + 5))


@pytest.mark.parametrize("seconds", [float("nan"), float("inf"), -1.0])
def test_a_duration_that_is_no_duration_is_not_kept(seconds: float) -> None:
    store = MeasureStore()
    store.record_start("chat", "h", seconds)
    assert store.get("chat", "h") is None and store.generation == 0


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "Expecting property name"),
        ("[]", "not a measurements file"),
        ('{"version": 2, "models": {}}', "version 2"),
        ('{"models": {}}', "version None"),
        ('{"version": 1, "models": {"chat": {"starts": [1]}}}', "no spec_hash"),
        ('{"version": 1, "models": {"chat": {"spec_hash": "h", "starts": ["x"]}}}', "durations"),
        ('{"version": 1, "models": {"chat": {"spec_hash": "h", "starts": [NaN]}}}', "durations"),
        ('{"version": 1, "models": {"chat": {"spec_hash": "h", "footprint": {"gpu0": 1}}}}', "footprint"),
    ],
)
def test_a_file_that_cannot_be_read_warns_once_and_counts_as_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str, why: str
) -> None:
    path = measures_path(tmp_path, "test")
    path.parent.mkdir()
    path.write_text(text)
    store = MeasureStore.load(path)
    assert store.kept == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0] and why in warnings[0] and "starting with none kept" in warnings[0]
    store.record_start("chat", "h", 2.0)  # and the next record writes a good file over it
    assert MeasureStore.load(path).get("chat", "h") is not None


def test_no_file_yet_is_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert MeasureStore.load(measures_path(tmp_path, "test")).kept == {}
    assert not caplog.records


def test_writes_leave_only_the_file(tmp_path: Path) -> None:
    path = measures_path(tmp_path, "test")
    store = MeasureStore(path)
    for second in range(3):
        store.record_start("chat", "h", float(second))
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.json"]


def test_a_failed_write_warns_once_and_leaves_no_temporary_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = measures_path(tmp_path, "test")
    path.mkdir(parents=True)  # a directory where the file should be: the rename fails
    store = MeasureStore(path)
    store.record_start("chat", "h", 1.0)
    store.record_start("chat", "h", 2.0)
    assert [p.name for p in path.parent.iterdir()] == ["test.json"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "measurements not written" in warnings[0]
    assert store.get("chat", "h") is not None  # kept in memory all the same


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_on_a_loop_the_file_is_written_behind_and_flushed(tmp_path: Path) -> None:
    path = measures_path(tmp_path, "test")
    store = MeasureStore(path)
    for second in range(5):
        store.record_start("chat", "h", float(second))
    await store.flush()
    kept = MeasureStore.load(path).get("chat", "h")
    assert kept is not None and kept.starts == (0.0, 1.0, 2.0, 3.0, 4.0)


# --- the cost rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "cost"),
    [
        ((), None),
        ((0.0,), 1),
        ((0.2,), 1),
        ((1.0,), 1),
        ((1.01,), 2),
        ((12.4,), 13),
        ((1.0, 2.0), 2),  # the median of two is their mean, 1.5
        ((3.0, 1.0, 2.0), 2),
        ((10.0, 11.0, 30.0, 12.4, 11.5), 12),  # one slow start moves nothing
    ],
)
def test_auto_cost_is_the_median_in_whole_seconds_rounded_up(
    seconds: tuple[float, ...], cost: int | None
) -> None:
    assert auto_cost(seconds) == cost


def test_where_each_cost_comes_from() -> None:
    parsed = config({"c": "auto", "code": 7, "new": "auto"})
    store = MeasureStore()
    for seconds in (12.0, 12.4, 13.1, 11.9, 20.0):
        store.record_start("chat", spec_hash(parsed, "chat"), seconds)
    assert effective_costs(parsed, store) == {
        "chat": Cost(13, "auto: median of 5 starts (12.4 s)"),
        "code": Cost(7, "evict_costs"),
        "new": Cost(1, "auto: not measured yet"),
    }
    assert effective_costs(config({}), store)["chat"] == Cost(1, "default")


def test_a_model_that_sleeps_costs_its_wakes() -> None:
    parsed = config("auto", chat={"sleep": 1})
    store = MeasureStore()
    store.record_start("chat", spec_hash(parsed, "chat"), 40.0)
    assert effective_costs(parsed, store)["chat"] == Cost(1, "auto: not measured yet")
    store.record_wake("chat", spec_hash(parsed, "chat"), 2.5)
    assert effective_costs(parsed, store)["chat"] == Cost(3, "auto: median of 1 wake (2.5 s)")


def test_measures_of_an_older_spec_do_not_count() -> None:
    parsed = config("auto")
    store = MeasureStore()
    store.record_start("chat", spec_hash(parsed, "chat"), 30.0)
    store.record_footprint("chat", spec_hash(parsed, "chat"), [(0, GIB)])
    assert effective_costs(parsed, store)["chat"].cost == 30
    changed = config("auto", chat={"command": "--other"})
    assert effective_costs(changed, store)["chat"] == Cost(1, "auto: not measured yet")
    assert kept_footprints(parsed, store) == {"chat": ((0, GIB),)}
    assert kept_footprints(changed, store) == {}


# --- the config --------------------------------------------------------------------------------------


def test_auto_alone_is_every_model_and_a_map_names_some() -> None:
    assert config("auto").evict_costs == {"chat": "auto", "code": "auto", "new": "auto"}
    assert config({"c": "auto", "code": 4}).evict_costs == {"chat": "auto", "code": 4}
    assert config({}).evict_costs == {}
    assert config({"c": "auto", "code": 4}).policy.cost("code") == 4
    assert config("auto").policy.cost("chat") == 1  # until measured


@pytest.mark.parametrize(
    ("costs", "path", "message"),
    [
        ("fast", "matrix.evict_costs", "expected 'auto' or a map of models to costs"),
        (["auto"], "matrix.evict_costs", "expected 'auto' or a map of models to costs"),
        ({"chat": "fast"}, "matrix.evict_costs.chat", "a cost is a positive integer or 'auto', got 'fast'"),
        ({"c": "Auto"}, "matrix.evict_costs.c", "a cost is a positive integer or 'auto', got 'Auto'"),
        ({"chat": 2.5}, "matrix.evict_costs.chat", "a cost is a positive integer or 'auto', got 2.5"),
        ({"chat": 0}, "matrix.evict_costs.chat", "a cost is a positive integer, got 0"),
        ({"zz": "auto"}, "matrix.evict_costs.zz", "unknown name 'zz'"),
    ],
)
def test_bad_costs_name_their_key_path(costs: object, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(costs)
    assert caught.value.path == path
    assert message in caught.value.message


def test_fit_mode_takes_auto_too() -> None:
    models = {name: {"image": "img", "gpus": 1, "vram": "10GiB"} for name in ("chat", "code")}
    document = {
        "models": models,
        "hardware": {"gpus": [{"memory": "24GiB"}]},
        "matrix": {"fit": "gpu", "evict_costs": {"chat": "auto"}},
    }
    parsed = parse_config(document, environ={})
    assert parsed.evict_costs == {"chat": "auto"}
    assert parsed.policy.cost("chat") == 1


# --- with_costs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("chat", "code", "evicted"), [(30, 2, "code"), (2, 30, "chat")])
def test_matrix_evicts_the_cheaper_by_measurement(chat: int, code: int, evicted: str) -> None:
    policy = config("auto").policy
    costed = policy.with_costs({"chat": chat, "code": code})
    decision = costed.decide("new", ["chat", "code"])
    assert (decision.evict, decision.cost) == ((evicted,), min(chat, code))
    assert policy.decide("new", ["chat", "code"]).cost == 1  # the policy itself is unchanged


@pytest.mark.parametrize(("chat", "code", "evicted"), [(30, 2, "code"), (2, 30, "chat")])
def test_fit_mode_evicts_the_cheaper_by_measurement(chat: int, code: int, evicted: str) -> None:
    ten = Footprint(10 * GIB, 1, ())
    policy = FitPolicy({"chat": 1, "code": 1, "new": 1}, {"chat": ten, "code": ten, "new": ten}, (24 * GIB,))
    decision = policy.with_costs({"chat": chat, "code": code}).decide("new", ["chat", "code"])
    assert decision.evict == (evicted,)


def test_costed_policy_gives_auto_models_their_measured_cost() -> None:
    parsed = config({"c": "auto", "code": "auto"})
    store = MeasureStore()
    assert costed_policy(parsed, store).decide("new", ["chat", "code"]).evict == (
        "code",
    )  # a tie: the first set
    store.record_start("chat", spec_hash(parsed, "chat"), 3.0)
    store.record_start("code", spec_hash(parsed, "code"), 20.0)
    assert costed_policy(parsed, store).decide("new", ["chat", "code"]).evict == ("chat",)
    unmeasured = config({"code": 5})
    assert costed_policy(unmeasured, store) is unmeasured.policy  # nothing auto: the policy as it is


def test_groups_have_no_costs_to_change() -> None:
    policy = GroupPolicy((), ("a", "b"))
    assert policy.with_costs({"a": 9}) is policy


# --- validate's notes -------------------------------------------------------------------------------------


def test_notes_on_measured_footprints() -> None:
    document = {
        "models": {
            "chat": {"image": "img", "gpus": 1, "vram": "18GiB"},
            "code": {"image": "img", "gpus": 1},
            "fits": {"image": "img", "gpus": 1, "vram": "8GiB"},
        },
        "instance": "test",
    }
    parsed = parse_config(document, environ={})
    measured = {
        "chat": ((0, int(19.05 * GIB)),),
        "code": ((0, 5 * GIB + 1), (1, 512 * 2**20)),
        "fits": ((0, 7 * GIB),),
        "gone": ((0, GIB),),  # no longer in the config
    }
    assert footprint_notes(parsed, measured) == [
        "models.chat.vram: chat held 19.1 GiB on GPU 0 when last measured, over its vram of 18 GiB",
        "models.code.vram: not set; code held 5.1 GiB on GPU 0, 512 MiB on GPU 1 when last measured: "
        "vram: 5.1GiB would declare it",
    ]
