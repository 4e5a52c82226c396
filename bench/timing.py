"""Timing one request, shared by the benchmarks that compare a path through swapctl with the
server called directly."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx


def first_byte(client: httpx.Client, url: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> float:
    """Seconds to a streamed answer's first body byte. llama-server closes its connection
    after a stream, so each streamed request opens its own (`Connection: close`); one that
    meets a pooled connection the server had closed is sent again, its time not counted."""
    while True:
        began = time.perf_counter()
        try:
            with client.stream("POST", url, json=body, headers={**headers, "connection": "close"}) as answer:
                chunks = answer.iter_raw()
                next(chunks)
                took = time.perf_counter() - began
                assert answer.status_code == 200
                for _ in chunks:
                    pass
            return took
        except httpx.RemoteProtocolError:
            continue


def median_ms(
    measure: Callable[[httpx.Client, str], float], client: httpx.Client, base: str, n: int
) -> float:
    """The median of `n` measures, in milliseconds."""
    return statistics.median(measure(client, base) for _ in range(n)) * 1000


def print_comparison(rows: dict[str, dict[str, list[float]]], through: str) -> None:
    """A table of each workload's medians over rounds, direct against `through` (both in ms,
    a round's median each), with the median of each round's difference and ratio."""
    print(f"{'workload':<12} {'direct ms':>10} {through + ' ms':>11} {'added ms':>9} {'ratio':>6}")
    for workload, by_target in rows.items():
        direct, other = by_target["direct"], by_target[through]
        added = statistics.median(o - d for o, d in zip(other, direct, strict=True))
        ratio = statistics.median(o / d for o, d in zip(other, direct, strict=True))
        print(
            f"{workload:<12} {statistics.median(direct):>10.2f} {statistics.median(other):>11.2f} "
            f"{added:>9.2f} {ratio:>6.2f}"
        )
