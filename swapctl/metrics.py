"""Per-model Prometheus metrics: what was asked of each model, and what it cost.

Counters and histograms are recorded as things happen; state and in-flight gauges are read
from the swapper when scraped, so nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swapctl_requests", "Requests answered, by model and HTTP status", ["model", "code"], registry=r
        )
        self.request_seconds = Histogram(
            "swapctl_request_duration_seconds",
            "Time from a request's arrival to the end of its answer",
            ["model"],
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
            registry=r,
        )
        self.starts = Counter(
            "swapctl_model_starts", "Container starts, by result", ["model", "result"], registry=r
        )
        self.start_seconds = Histogram(
            "swapctl_model_start_duration_seconds",
            "Time from the start of a swap to the model answering its health check",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.evictions = Counter(
            "swapctl_model_evictions", "Stops to make room or on request", ["model"], registry=r
        )
        self.crashes = Counter(
            "swapctl_model_crashes", "Containers found dead while ready", ["model"], registry=r
        )

    def watch(self, read: Callable[[], Sequence[tuple[str, str, int]]], states: Sequence[str]) -> None:
        """Report (model, state, in flight) as gauges, read at each scrape; `states` are
        every state a model can be in (each gets a series, 1 for the current one)."""
        self.registry.register(_Live(read, states))

    def render(self) -> bytes:
        return generate_latest(self.registry)
