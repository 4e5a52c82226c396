"""The last hour for the page's charts: requests and tokens in buckets, states as intervals,
GPU samples; what is older than the span is forgotten, and the JSON is dense where the
charts need it to be."""

from __future__ import annotations

from swapctl.gpus import Device, GpuProcess, Snapshot
from swapctl.lifecycle.history import History

GIB = 1 << 30


class Wall:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_answers_are_counted_per_model_in_their_bucket_and_gaps_are_zero() -> None:
    wall = Wall(1000.0)
    history = History(wall, bucket=10, span=60)
    history.served("a", 5)
    history.served("a", None)
    wall.now = 1021.0  # two buckets later
    history.served("b", 7)
    found = history.to_json()
    assert found["times"] == [1000.0, 1010.0, 1020.0]
    assert found["models"] == {
        "a": {"requests": [2, 0, 0], "tokens": [5, 0, 0]},
        "b": {"requests": [0, 0, 1], "tokens": [0, 0, 7]},
    }
    assert found["gpu"] is None


def test_buckets_older_than_the_span_are_forgotten_and_times_run_to_now() -> None:
    wall = Wall(1000.0)
    history = History(wall, bucket=10, span=60)
    history.served("a", 1)
    wall.now = 1075.0
    history.served("b", 1)
    wall.now = 1095.0
    found = history.to_json()
    assert "a" not in found["models"]  # its bucket ended more than 60 s ago
    assert found["times"] == [1070.0, 1080.0, 1090.0]
    assert found["models"]["b"]["requests"] == [1, 0, 0]


def test_states_are_intervals_and_stopped_is_a_gap() -> None:
    wall = Wall(100.0)
    history = History(wall, bucket=10, span=3600)
    history.state("a", "starting")
    wall.now = 130.0
    history.state("a", "ready")
    history.state("a", "ready")  # a repeat changes nothing
    wall.now = 200.0
    history.state("a", "stopping")
    history.state("b", "starting")
    wall.now = 205.0
    history.state("a", "stopped")
    assert history.to_json()["states"] == [
        {"model": "a", "state": "starting", "from": 100.0, "to": 130.0},
        {"model": "a", "state": "ready", "from": 130.0, "to": 200.0},
        {"model": "a", "state": "stopping", "from": 200.0, "to": 205.0},
        {"model": "b", "state": "starting", "from": 200.0, "to": None},
    ]
    wall.now = 205.0 + 3600.0 + 1  # a's intervals ended more than an hour ago; b's goes on
    assert history.to_json()["states"] == [{"model": "b", "state": "starting", "from": 200.0, "to": None}]


def test_gpu_samples_give_each_device_and_each_model_a_series() -> None:
    wall = Wall(50.0)
    history = History(wall, bucket=10, span=3600)

    def snapshot(used: int, chat: int | None) -> Snapshot:
        processes = (GpuProcess(10, chat * GIB, "chat"),) if chat is not None else ()
        return Snapshot((Device(0, "u0", "H100", 80 * GIB, used * GIB, processes),))

    history.gpu(snapshot(1, None))
    wall.now = 60.0
    history.gpu(snapshot(21, 20))
    found = history.to_json()["gpu"]
    assert found["times"] == [50.0, 60.0]
    assert found["devices"] == [{"index": 0, "name": "H100", "total": 80 * GIB, "used": [1 * GIB, 21 * GIB]}]
    assert found["models"] == {"chat": [0, 20 * GIB]}
