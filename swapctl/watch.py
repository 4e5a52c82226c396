"""`swapctl status --watch`: a live table of every model, fed by the proxy's event stream
(GET /events; its events are described in `swapctl.lifecycle.activity`).

Reading the stream (`read_events`), keeping what it said (`Board`) and drawing the table
(`Board.table`) are each a function of their input, tested without a proxy; `watch` joins
them to an HTTP stream and a rich `Live` display.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from swapctl.errors import SwapctlError

STATS = ("requests_per_s", "tokens_per_s", "requests")
COLOURS = {
    "ready": "green",
    "pulling": "yellow",
    "starting": "yellow",
    "stopping": "yellow",
    "leaving": "yellow",
}
COLOURS |= {"stop-failed": "red", "sleeping": "blue"}
WIDE = 130  # columns a terminal needs for the containers' names
READ_TIMEOUT = 30.0  # seconds without a byte (stats come every second, comments every 15 s)


def read_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """Server-Sent Events from a stream's lines: (name, parsed JSON data) for each event;
    comments and events whose data is not JSON are skipped."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            parsed = _json("\n".join(data)) if data else None
            if parsed is not None:
                yield name, parsed
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)


@dataclass
class Board:
    """What the events said: each model's last row (and when it came, so that uptime and
    idle time go on counting), and the last swap."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    last_swap: dict[str, Any] | None = None

    def apply(self, name: str, data: Any, now: float) -> None:
        if name == "snapshot":
            self.rows, self.seen = {}, {}
            for row in data.get("models", []):
                self._set(row, now)
            swaps = data.get("swaps") or []
            self.last_swap = swaps[-1] if swaps else None
        elif name == "model":
            self._set(data, now)
        elif name == "swap":
            self.last_swap = data
        elif name == "stats":
            for model, stats in data.get("models", {}).items():
                if model in self.rows:
                    self.rows[model].update({key: stats.get(key) for key in STATS})

    def _set(self, row: dict[str, Any], now: float) -> None:
        model = row["model"]
        if row.get("state") == "removed":  # a reload removed it, and it has stopped
            self.rows.pop(model, None)
            return
        stats = {key: self.rows[model].get(key) for key in STATS} if model in self.rows else {}
        self.rows[model] = {**stats, **row}
        self.seen[model] = now

    def table(self, title: str, now: float, containers: bool = True) -> Table:
        """The table at `now`; without the containers' names (the widest column) if asked."""
        table = Table(
            title=title, title_justify="left", caption=_swap_line(self.last_swap), caption_justify="left"
        )
        for column in ("model", "state", *(("container",) if containers else ()), "port", "up", "idle"):
            table.add_column(column, overflow="fold", no_wrap=column in ("model", "state"))
        for column in ("in flight", "last start", "req/s", "tok/s", "requests"):
            table.add_column(column, justify="right")
        for model, row in self.rows.items():
            later = now - self.seen.get(model, now)
            state = str(row.get("state"))
            table.add_row(
                model,
                f"[{COLOURS[state]}]{state}[/]" if state in COLOURS else state,
                *(
                    (row.get("container") or (f"@{row['place']}" if row.get("place") else "-"),)
                    if containers
                    else ()
                ),
                str(row.get("host_port") or "-"),
                _duration(_grown(row.get("ready_seconds"), later)),
                _duration(_grown(row.get("idle_seconds"), later)),
                _text(row.get("in_flight")),
                _took(row.get("last_start_seconds")),
                _rate(row.get("requests_per_s"), 2),
                _rate(row.get("tokens_per_s"), 1),
                _text(row.get("requests")),
            )
        return table


def watch(url: str, headers: dict[str, str], title: str, console: Console) -> None:
    """Draw the table again on each event of `url`'s /events until the stream ends, which
    raises a SwapctlError (the proxy went away). Ctrl-C is the caller's to catch."""
    import httpx

    board = Board()
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT)
    try:
        with httpx.stream("GET", f"{url}/events", headers=headers, timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                raise SwapctlError(f"{url}/events answered {response.status_code}: {_message(response)}")
            wide = console.width >= WIDE

            def render(now: float) -> Table:
                return board.table(title, now, containers=wide)

            draw(board, read_events(response.iter_lines()), render, console)
    except httpx.ConnectError:
        raise SwapctlError(f"no swapctl up answers at {url}") from None
    except httpx.TransportError as error:
        raise SwapctlError(f"the proxy at {url} went away ({type(error).__name__})") from None
    raise SwapctlError(f"the proxy at {url} went away (it ended the event stream)")


def draw(
    board: Board,
    events: Iterable[tuple[str, Any]],
    render: Callable[[float], Table],
    console: Console,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Apply each event to `board` and show the table again, until the events end."""
    with Live(console=console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False) as live:
        for name, data in events:
            now = clock()
            board.apply(name, data, now)
            live.update(render(now), refresh=True)


def _json(text: str) -> Any:
    """The JSON value of `text`; None when it is none."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return str(response.text[:200])


def _swap_line(swap: dict[str, Any] | None) -> str | None:
    if swap is None:
        return None
    at = time.strftime("%H:%M:%S", time.localtime(swap.get("at") or 0))
    evicted = ", ".join(swap.get("evicted") or []) or "nothing"
    where = f" in set {swap['set']}" if swap.get("set") else ""
    if not swap.get("ok"):
        return f"last swap, {at}: {swap.get('model')} failed after {_took(swap.get('seconds'))}: {swap.get('error')}"
    return (
        f"last swap, {at}: {swap.get('model')}{where} ready in {_took(swap.get('seconds'))}, "
        f"stopped {evicted} (cost {swap.get('cost')})"
    )


def _grown(seconds: Any, later: float) -> float | None:
    return seconds + later if isinstance(seconds, (int, float)) else None


def _duration(value: float | None) -> str:
    if value is None:
        return "-"
    whole = int(value)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 60}m{whole % 60:02d}s"


def _took(value: Any) -> str:
    return f"{value:.1f}s" if isinstance(value, (int, float)) else "-"


def _rate(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _text(value: Any) -> str:
    return "-" if value is None else str(value)
