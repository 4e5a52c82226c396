"""The lifecycle read from the engine when no proxy answers: statuses from containers, and
the models `plan` counts as running."""

from __future__ import annotations

from swapctl.backend import Container
from swapctl.config import parse_config
from swapctl.lifecycle.observed import counted_running, read_statuses, to_json
from swapctl.lifecycle.slot import State

CONFIG = parse_config(
    {
        "models": {
            "a": {"image": "img", "sleep": 1},
            "b": {"image": "img", "sleep": 1},
            "c": {"image": "img"},
            "d": {"image": "img"},
        }
    }
)


def box(model: str, state: str = "running", started_at: float | None = 100.0) -> Container:
    return Container(
        f"id-{model}", f"box-{model}", model, state, 40000, "hash", started_at, placed=("1", "x")
    )


def test_each_model_from_its_container_in_the_config_order() -> None:
    asked: list[str] = []

    def asleep(container: Container) -> bool:
        asked.append(container.model)
        return container.model == "a"

    found = read_statuses(CONFIG, [box("c", "exited", None), box("b"), box("a")], asleep, now=130.0)
    assert [(s.model, s.state) for s in found] == [
        ("a", State.SLEEPING.value),
        ("b", "running"),  # the engine's word: nobody asked its health
        ("c", "exited"),
        ("d", State.STOPPED.value),
    ]
    assert asked == ["a", "b"]  # only running containers of models with `sleep`
    assert found[1].ready_seconds == 30.0 and found[1].gpus == (1,)
    assert found[2].ready_seconds is None


def test_a_row_leaves_out_what_the_engine_cannot_tell() -> None:
    found = read_statuses(CONFIG, [box("b")], lambda _: False, now=130.0)
    running, stopped = found[1], found[2]
    assert to_json(stopped) == {
        "model": "c",
        "state": "stopped",
        "container": None,
        "host_port": None,
        "in_flight": None,
        "ready_seconds": None,
        "idle_seconds": None,
        "gpus": None,
    }
    assert to_json(running)["in_flight"] is None and "gpu_memory" not in to_json(running)


def test_plan_counts_neither_gone_nor_pulling_models() -> None:
    states = [
        "ready",
        "running",
        "starting",
        "exited",
        "stopped",
        "pulling",
        "stopping",
        "leaving",
        "sleeping",
    ]
    rows = [{"model": f"m{i}-{state}", "state": state} for i, state in enumerate(states)]
    assert counted_running(rows) == ["m0-ready", "m1-running", "m2-starting", "m3-exited"]
