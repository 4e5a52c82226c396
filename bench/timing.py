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
