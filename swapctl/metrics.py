"""Per-model Prometheus metrics: what was asked of each model, and what it cost.

Counters and histograms are recorded as things happen; state and in-flight gauges are read
from the swapper when scraped, so nothing is counted twice. GPU memory, where a GPU exists,
is read at each scrape too, in a thread (the driver can be slow), never while serving a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from swapctl.gpus import NoGpu, Snapshot


class _Live(Collector):
    def __init__(self, read: Callable[[], Sequence[tuple[str, str, int]]], states: Sequence[str]) -> None:
        self.read = read
        self.states = states

    def collect(self) -> Iterable[GaugeMetricFamily]:
        state = GaugeMetricFamily(
            "swapctl_model_state", "1 for the state each model is in", labels=["model", "state"]
        )
        in_flight = GaugeMetricFamily("swapctl_model_in_flight", "Requests in flight", labels=["model"])
        for model, now, busy in self.read():
            for name in self.states:
                state.add_metric([model, name], 1.0 if name == now else 0.0)
            in_flight.add_metric([model], busy)
        yield state
        yield in_flight


class _Gpus(Collector):
    """Memory per device and per model, from the last snapshot `refresh` read."""

    def __init__(self, read: Callable[[], Snapshot | NoGpu]) -> None:
        self.read = read
        self.latest: Snapshot | NoGpu = NoGpu("not read yet")

    def refresh(self) -> None:
        self.latest = self.read()

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = ["device", "uuid"]
        total = GaugeMetricFamily("swapctl_gpu_memory_total_bytes", "GPU memory, by device", labels=labels)
        used = GaugeMetricFamily(
            "swapctl_gpu_memory_used_bytes", "GPU memory in use, by device", labels=labels
        )
        by_model = GaugeMetricFamily(
            "swapctl_model_gpu_memory_bytes", "GPU memory the model's processes hold", labels=["model"]
        )
        snapshot = self.latest
        if isinstance(snapshot, Snapshot):
            for device in snapshot.devices:
                total.add_metric([str(device.index), device.uuid], device.memory_total)
                used.add_metric([str(device.index), device.uuid], device.memory_used)
            for model, held in sorted(snapshot.memory_by_model().items()):
                by_model.add_metric([model], held)
        yield total
        yield used
        yield by_model


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.gpus: _Gpus | None = None
        self._release_seconds: Histogram | None = None
        r = self.registry
        self.requests = Counter(
            "swapctl_requests", "Requests answered, by model and HTTP status", ["model", "code"], registry=r
        )
        self.request_seconds = self._per_model_seconds(
            "swapctl_request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
        self.starts = Counter(
            "swapctl_model_starts", "Container starts, by result", ["model", "result"], registry=r
        )
        self.start_seconds = self._per_model_seconds(
            "swapctl_model_start_duration_seconds",
            "Time from the start of a swap to the model answering its health check",
            (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.wake_seconds = self._per_model_seconds(
            "swapctl_model_wake_duration_seconds",
            "Time a sleeping model took to wake (POST /wake_up until GET /is_sleeping says false)",
            (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.evictions = Counter(
            "swapctl_model_evictions", "Stops to make room or on request", ["model"], registry=r
        )
        self.crashes = Counter(
            "swapctl_model_crashes", "Containers found dead while ready", ["model"], registry=r
        )
        self.watchdog = Counter(
            "swapctl_watchdog_repairs",
            "Models found in a transitional state past their deadline or with no task moving them, and repaired",
            ["model", "state"],
            registry=r,
        )

    def watch(self, read: Callable[[], Sequence[tuple[str, str, int]]], states: Sequence[str]) -> None:
        """Report (model, state, in flight) as gauges, read at each scrape; `states` are
        every state a model can be in (each gets a series, 1 for the current one)."""
        self.registry.register(_Live(read, states))

    def watch_gpus(self, read: Callable[[], Snapshot | NoGpu]) -> None:
        """Report GPU memory per device and per model, from `read` (blocking) at each scrape."""
        self.gpus = _Gpus(read)
        self.registry.register(self.gpus)

    def release_seconds(self) -> Histogram:
        """The histogram of waits for a stopped model's GPU memory to be back; registered on
        first use, so that a proxy with no GPU exports no GPU series."""
        if self._release_seconds is None:
            self._release_seconds = self._per_model_seconds(
                "swapctl_gpu_release_seconds",
                "Time a start waited, once an evicted model stopped, for its GPU memory to be back",
                (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            )
        return self._release_seconds

    def _per_model_seconds(self, name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
        """A histogram of durations in this registry, a series per model."""
        return Histogram(name, documentation, ["model"], buckets=buckets, registry=self.registry)

    async def scrape(self) -> bytes:
        """The text exposition, GPU memory read first (in a thread) where it is watched."""
        if self.gpus is not None:
            await asyncio.to_thread(self.gpus.refresh)
        return self.render()

    def render(self) -> bytes:
        return generate_latest(self.registry)
