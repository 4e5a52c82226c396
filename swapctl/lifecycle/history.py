"""The last hour, for the page's charts (GET /history): what each model served, which models
ran when, and what the GPUs held.

- Requests: each model's answers and the tokens they reported, counted in BUCKET-second
  buckets (a chart divides by BUCKET for requests and tokens per second).
- States: each model's states as intervals (`ready` from 10:02:13 to 10:09:40), so that a
  timeline shows the swaps; `stopped` is the absence of an interval.
- GPU memory: a sample every BUCKET seconds where a GPU is seen, per device (used of total)
  and per model (what its container's processes hold), taken by whoever reads the GPUs.

Anything older than SPAN is forgotten. Recording is a counter bump or a deque append on the
event loop, so the request path and the state machine pay almost nothing; the JSON is built
only when asked:

    {"bucket": 10, "span": 3600, "now": epoch seconds,
     "times": [the start of each bucket, oldest first, from the first kept to now],
     "models": {MODEL: {"requests": [int per bucket], "tokens": [int per bucket]}},
     "states": [{"model", "state", "from": epoch, "to": epoch | null (still)}, oldest first],
     "gpu": null | {"times": [epoch per sample],
                    "devices": [{"index", "name", "total": bytes, "used": [bytes per sample]}],
                    "models": {MODEL: [bytes per sample]}}}
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from swapctl.gpus import Snapshot

BUCKET = 10.0  # seconds per bucket of counts, and between GPU samples
SPAN = 3600.0  # seconds kept
QUIET = frozenset({"stopped", "removed"})  # states a timeline leaves blank


@dataclass
class Counts:
    requests: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class Interval:
    model: str
    state: str
    start: float  # epoch seconds
    end: float | None = None  # None: still in it

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "state": self.state, "from": self.start, "to": self.end}


@dataclass(frozen=True)
class GpuSample:
    at: float
    devices: tuple[tuple[int, str, int, int], ...]  # (index, name, used bytes, total bytes)
    models: tuple[tuple[str, int], ...]  # (model, bytes over every device)


class History:
    """The last `span` seconds of requests, states and GPU memory; `wall` dates them (epoch)."""

    def __init__(
        self, wall: Callable[[], float] = time.time, *, bucket: float = BUCKET, span: float = SPAN
    ) -> None:
        self.wall, self.bucket, self.span = wall, bucket, span
        self.buckets: deque[tuple[int, dict[str, Counts]]] = deque()  # (bucket number, counts), oldest first
        self.current: dict[str, Interval] = {}  # model -> the interval it is in now
        self.ended: deque[Interval] = deque()  # closed intervals, by their end
        self.samples: deque[GpuSample] = deque()

    # --- recording ------------------------------------------------------------------------

    def served(self, model: str, tokens: int | None) -> None:
        """One answer of `model`, with the tokens it reported."""
        number = int(self.wall() // self.bucket)
        if not self.buckets or self.buckets[-1][0] != number:
            self.buckets.append((number, {}))
            self._forget()
        counts = self.buckets[-1][1].get(model)
        if counts is None:
            counts = self.buckets[-1][1][model] = Counts()
        counts.requests += 1
        counts.tokens += tokens or 0

    def state(self, model: str, state: str) -> None:
        """`model` is in `state` now (a repeat of the state it is in changes nothing)."""
        now = self.wall()
        was = self.current.get(model)
        if was is not None and was.state == state:
            return
        if was is not None:
            self.ended.append(replace(was, end=now))
            del self.current[model]
            self._forget()
        if state not in QUIET:
            self.current[model] = Interval(model, state, now)

    def gpu(self, snapshot: Snapshot) -> None:
        """One sample of the GPUs (attributed: its processes name their models)."""
        devices = tuple((d.index, d.name, d.memory_used, d.memory_total) for d in snapshot.devices)
        models = tuple(sorted(snapshot.memory_by_model().items()))
        self.samples.append(GpuSample(self.wall(), devices, models))
        self._forget()

    def _forget(self) -> None:
        oldest = self.wall() - self.span
        while self.buckets and (self.buckets[0][0] + 1) * self.bucket <= oldest:
            self.buckets.popleft()
        while self.ended and self.ended[0].end is not None and self.ended[0].end <= oldest:
            self.ended.popleft()
        while self.samples and self.samples[0].at <= oldest:
            self.samples.popleft()

    # --- reading --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        self._forget()
        now = self.wall()
        last = int(now // self.bucket)
        first = self.buckets[0][0] if self.buckets else last
        times = [n * self.bucket for n in range(first, last + 1)]
        models: dict[str, dict[str, list[int]]] = {}
        for number, counts in self.buckets:
            for model, count in counts.items():
                series = models.get(model)
                if series is None:
                    series = models[model] = {"requests": [0] * len(times), "tokens": [0] * len(times)}
                series["requests"][number - first] = count.requests
                series["tokens"][number - first] = count.tokens
        return {
            "bucket": self.bucket,
            "span": self.span,
            "now": now,
            "times": times,
            "models": models,
            "states": self.states_json(),
            "gpu": self._gpu_json() if self.samples else None,
        }

    def states_json(self) -> list[dict[str, Any]]:
        """The intervals kept, oldest first (as `to_json` gives them under "states")."""
        self._forget()
        states = sorted([*self.ended, *self.current.values()], key=lambda i: (i.start, i.model))
        return [interval.to_json() for interval in states]

    def _gpu_json(self) -> dict[str, Any]:
        samples = list(self.samples)
        devices: dict[int, dict[str, Any]] = {}
        models: dict[str, list[int]] = {}
        for at, sample in enumerate(samples):
            for index, name, used, total in sample.devices:
                device = devices.get(index)
                if device is None:
                    device = devices[index] = {"index": index, "name": name, "total": total}
                    device["used"] = [None] * len(samples)  # a device not seen then: a gap
                device["used"][at] = used
                device["total"] = total
            for model, held in sample.models:
                models.setdefault(model, [0] * len(samples))[at] = held
        return {
            "times": [sample.at for sample in samples],
            "devices": [devices[index] for index in sorted(devices)],
            "models": models,
        }
