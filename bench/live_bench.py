"""What the live page costs swapctl's proxy, and how long a reload of one changed model takes, in one run.

Run: .venv/bin/python bench/live_bench.py [--rounds 5] [--seconds 1.5] [--idle-seconds 4] [--reload-runs 5]
(needs what bench/proxy_bench.py needs, whose config, Go load generator and phases it reuses,
and Chromium with Playwright, `make browser`). The default run takes about 3 minutes on 2 cores.

The page's cost. One `swapctl up` serves the echo server (scripts/echo_server.py, model e1).
In each round, in three conditions whose order rotates from round to round, the Go load
generator runs plain chat completions with 32 clients, then with 1 client, after the
proxy's idle CPU is read over a few seconds with no request:

- nothing: nothing reads `/events` (the browser runs, with no page open);
- reader: one raw `GET /events` subscriber, a thread reading the stream with httpx;
- page: `/ui` open in headless Chromium, which holds one `/events` stream and renders every
  event (checked: once the phases are done, its e1 row counts every request they made).

Figures: the proxy's CPU per request (utime+stime of its process from /proc/PID/stat, over
the measured part), requests/s, p50 latency: each the median over rounds, and each
condition's ratio to "nothing" the median of the rounds' ratios, with the lowest and highest
round's in brackets. Idle CPU per second adds up every round's idle spell, as /proc counts
CPU in 10 ms ticks.

Reload. Another `swapctl up` runs m1 (llama-server, with a context long enough to stream
for a few seconds) and e1. Each run changes e1's container (an environment variable) in the
file, then applies it: by `POST /reload`, or as users had to before, by stopping `up`
(SIGINT) and starting it again on the same port (it adopts m1's unchanged container); each
either with nothing in flight or while a streamed request to m1 is in flight. Measured from
the moment it is applied: the new config in force (the reload's answer; the new `up`
answering /health), a request to e1 answered by its new container (e1's container ID in
Docker has changed, and it is the one /running publishes), and the end of m1's request.
Checked: m1's container is the same, and m1's request completed. The four kinds of run take
turns, their order rotating; figures are medians of runs, "restart / reload" the ratio of
the two medians with nothing in flight.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, Page, sync_playwright

# bench/ is on sys.path when this file runs as a script: the shared parts come from there
from proxy_bench import (
    CHAT,
    MANY,
    Phase,
    Target,
    build_go,
    config,
    cpu_seconds,
    free_port,
    load_average,
    machine,
    median_of,
    ratio,
    run_phase,
    start_models,
    stop,
    swapctl_up,
    wait_until_answers,
    workloads,
    write_models,
)

import swapctl
from swapctl.backend.docker import DockerBackend

CHROMIUM = "/usr/bin/chromium"
CONDITIONS = ("nothing", "reader", "page")
LABELS = {"nothing": "nothing open", "reader": "/events reader", "page": "page open"}
LOADS = ("echo plain x32", "echo plain")  # proxy_bench's workloads on the echo server
SETTLE = 0.5  # seconds after a condition is set up before its idle CPU is read
IN_FLIGHT_TOKENS = 3000  # m1's streamed request across a change: a few seconds on 2 cores


# -- what watches the proxy ----------------------------------------------------------------

# Given the requests answered while it watched, raises if the watcher missed them or broke;
# returns the events it read, where it counts them.
Check = Callable[[int], int | None]


class Reader:
    """A raw `/events` subscriber: a thread reading the stream and counting its events."""

    def __init__(self, url: str) -> None:
        self.url, self.events, self.error = url, 0, ""
        self.opened, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> Reader:
        self.thread.start()
        if not self.opened.wait(10):
            raise RuntimeError(f"GET /events sent no snapshot: {self.error}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()  # seen at the next line: a stats event comes every second
        self.thread.join(10)

    def _read(self) -> None:
        try:
            with httpx.stream("GET", self.url + "/events", timeout=httpx.Timeout(5, read=30)) as events:
                for line in events.iter_lines():
                    if line.startswith("event: "):
                        self.events += 1
                        self.opened.set()
                    if self.stopping.is_set():
                        return
        except httpx.HTTPError as error:
            self.error = f"{type(error).__name__}: {error}"
        if not self.stopping.is_set():
            self.error = self.error or "the stream ended"


def page_requests(tab: Page) -> int:
    """The requests the page's e1 row counts (from the stats events)."""
    cell = "document.querySelector('#models tr[data-model=\"e1\"] td.requests')"
    return int(tab.evaluate(f"() => Number({cell}?.textContent) || 0"))


@contextmanager
def page_open(browser: Browser, url: str) -> Iterator[Check]:
    """/ui in a fresh tab, live. Yields a check: the page counts the `sent` requests made
    since it opened, and neither failed nor disconnected."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    try:
        tab = context.new_page()
        problems: list[str] = []
        tab.on("pageerror", lambda error: problems.append(str(error)))
        tab.goto(url + "/ui")
        tab.locator("#status").filter(has_text="live").wait_for(timeout=10_000)
        seen = page_requests(tab)

        def check(sent: int) -> None:
            deadline = time.monotonic() + 10
            while page_requests(tab) < seen + sent and time.monotonic() < deadline:
                time.sleep(0.1)
            status = tab.locator("#status").text_content()
            if problems or status != "live" or page_requests(tab) < seen + sent:
                counted = page_requests(tab) - seen
                raise RuntimeError(f"the page: {problems}, status {status!r}, {counted} of {sent} requests")

        yield check
    finally:
        context.close()


@contextmanager
def reading(url: str) -> Iterator[Check]:
    with Reader(url) as reader:

        def check(sent: int) -> int:
            if reader.error:
                raise RuntimeError(f"the /events reader: {reader.error}")
            return reader.events

        yield check


@contextmanager
def watching(condition: str, url: str, browser: Browser) -> Iterator[Check]:
    """Set up a condition; yields its check."""
    if condition == "page":
        with page_open(browser, url) as check:
            yield check
    elif condition == "reader":
        with reading(url) as check:
            yield check
    else:
        yield lambda sent: None


# -- the page's cost -----------------------------------------------------------------------


@dataclass
class Round:
    phases: dict[tuple[str, str], Phase] = field(default_factory=dict)  # (condition, load) -> phase
    idle: dict[str, tuple[float, float]] = field(default_factory=dict)  # condition -> (CPU s, wall s)
    events_per_s: dict[str, float] = field(default_factory=dict)  # condition -> what its watcher read


def idle_cpu(pid: int, seconds: float) -> tuple[float, float]:
    """The process's CPU seconds over `seconds` in which nothing is asked of it, and those seconds."""
    before, began = cpu_seconds(pid), time.perf_counter()
    time.sleep(seconds)
    return cpu_seconds(pid) - before, time.perf_counter() - began


def run_condition(
    condition: str, target: Target, loader: Path, browser: Browser, seconds: float, idle: float, into: Round
) -> None:
    assert target.pid
    loads = [w for w in workloads() if w.key in LOADS]
    with watching(condition, target.urls["echo"], browser) as check:
        began = time.perf_counter()
        time.sleep(SETTLE)
        if idle:
            into.idle[condition] = idle_cpu(target.pid, idle)
        for load in loads:
            into.phases[condition, load.key] = run_phase(loader, target, load, seconds)
        events = check(sum(len(into.phases[condition, w.key].latencies) for w in loads))
        if events is not None:
            into.events_per_s[condition] = events / (time.perf_counter() - began)


def measure_page(loader: Path, target: Target, browser: Browser, args: argparse.Namespace) -> list[Round]:
    """A short warm-up round, not counted, then the rounds; the conditions' order rotates."""
    for condition in CONDITIONS:
        run_condition(condition, target, loader, browser, 0.3, 0, Round())
    rounds: list[Round] = []
    for n in range(args.rounds):
        began = time.perf_counter()
        order = CONDITIONS[n % 3 :] + CONDITIONS[: n % 3]
        rounds.append(Round())
        for condition in order:
            run_condition(condition, target, loader, browser, args.seconds, args.idle_seconds, rounds[-1])
        print(f"page round {n + 1}/{args.rounds}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    return rounds


Figure = Callable[[Round, str], float | None]  # one round's figure in a condition


def per_request_ms(load: str) -> Figure:
    def value(r: Round, condition: str) -> float | None:
        phase = r.phases[condition, load]
        return (
            phase.cpu_seconds / len(phase.latencies) * 1e3 if phase.cpu_seconds and phase.latencies else None
        )

    return value


def rate(load: str) -> Figure:
    return lambda r, condition: r.phases[condition, load].rate


def p50_ms(load: str) -> Figure:
    return lambda r, condition: r.phases[condition, load].percentile(0.5) * 1e3


def page_rows() -> list[tuple[str, str, Figure]]:
    """(label, kind, figure): kind "rate" prints whole numbers."""
    measures = (
        ("CPU ms per request", "ms", per_request_ms),
        ("req/s", "rate", rate),
        ("p50 ms", "ms", p50_ms),
    )
    return [
        (f"{label}, {clients} client{'s' if clients > 1 else ''}", kind, figure(load))
        for label, kind, figure in measures
        for load, clients in zip(LOADS, (MANY, 1), strict=True)
    ]


def figure_text(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if kind == "rate" else f"{value:.3f}" if value < 1 else f"{value:.2f}"


def ratio_text(rounds: list[Round], figure: Figure, condition: str) -> str:
    ratios = [ratio(figure(r, condition), figure(r, "nothing")) for r in rounds]
    present = [v for v in ratios if v is not None]
    if not present:
        return "-"
    return f"{statistics.median(present):.2f}x ({min(present):.2f}-{max(present):.2f})"


def idle_row(rounds: list[Round]) -> str:
    """CPU over all rounds' idle spells together: /proc counts CPU in ticks (10 ms)."""
    idle = {
        c: 1e3 * sum(r.idle[c][0] for r in rounds) / sum(r.idle[c][1] for r in rounds)
        for c in CONDITIONS
        if all(c in r.idle for r in rounds)
    }
    if len(idle) < len(CONDITIONS):
        return "| idle CPU ms per s, no requests | - | - | - | - | - |"
    spell = sum(r.idle["nothing"][1] for r in rounds)
    ratios = [ratio(idle[c], idle["nothing"]) for c in CONDITIONS[1:]]
    return (
        f"| idle CPU ms per s, no requests ({spell:.0f} s each, all rounds) | "
        + " | ".join(figure_text(idle[c], "ms") for c in CONDITIONS)
        + " | "
        + " | ".join("-" if v is None else f"{v:.2f}x" for v in ratios)
        + " |"
    )


def render_page(rounds: list[Round]) -> list[str]:
    names = [LABELS[c] for c in CONDITIONS]
    lines = [
        f"| echo server, swapctl | {' | '.join(names)} | reader / nothing | page / nothing |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, kind, figure in page_rows():
        medians = [figure_text(median_of([figure(r, c) for r in rounds]), kind) for c in CONDITIONS]
        ratios = [ratio_text(rounds, figure, c) for c in CONDITIONS[1:]]
        lines.append(f"| {label} | {' | '.join(medians)} | {' | '.join(ratios)} |")
    lines.append(idle_row(rounds))
    events = median_of([r.events_per_s.get("reader") for r in rounds])
    if events is not None:
        lines += ["", f"The /events reader read {events:.1f} events per second while it watched (median)."]
    failed = [(c, k, p) for r in rounds for (c, k), p in r.phases.items() if p.errors]
    lines += [
        f"Failed requests (not counted), {c}, {k}: {p.errors}, the first: {p.first_error}"
        for c, k, p in failed
    ]
    return lines


# -- reload --------------------------------------------------------------------------------


class InFlight:
    """A streamed chat completion in a thread, long enough to span a reload or a restart."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.first = threading.Event()
        self.done, self.error, self.ended_at = False, "", 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> InFlight:
        self.thread.start()
        if not self.first.wait(30) or self.error:
            raise RuntimeError(f"the request to {self.model} did not start streaming: {self.error}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(120)

    def _run(self) -> None:
        body = {
            **CHAT,
            "model": self.model,
            "stream": True,
            "max_tokens": IN_FLIGHT_TOKENS,
            "ignore_eos": True,
        }
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=60) as answer:
                answer.raise_for_status()
                for line in answer.iter_lines():
                    self.first.set()
                    self.done = self.done or line == "data: [DONE]"
        except httpx.HTTPError as error:
            self.error = f"{type(error).__name__}: {error}"
        self.ended_at = time.perf_counter()
        self.first.set()


KINDS = (("reload", False), ("reload", True), ("restart", False), ("restart", True))  # (how, m1 streaming)


@dataclass(frozen=True)
class Change:
    """One run: e1 changed in the file, then the change applied by `how`; times from its start."""

    how: str  # "reload" or "restart"
    streaming: bool  # a streamed request to m1 was in flight across it
    in_force_s: float  # until the reload answered; the new `up` answered /health
    e1_new_s: float  # until a request to e1 was answered by its new container
    e1_replaced: bool
    m1_kept: bool
    completed: bool | None  # m1's request finished its stream; None: there was none
    ended_s: float | None  # when m1's request ended
    note: str


class RestartableUp:
    """The reload part's `swapctl up`, on one port, kept running between runs; started
    without --stop-on-exit, so that a new one adopts its containers."""

    def __init__(self, config_path: Path, work: Path, instance: str) -> None:
        self.config_path, self.work, self.instance = config_path, work, instance
        self.port, self.starts = free_port(), 0
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.backend = DockerBackend()

    def start(self) -> None:
        self.starts += 1
        command = [sys.executable, "-m", "swapctl", "up", "-c", str(self.config_path)]
        command += ["--listen", f"127.0.0.1:{self.port}"]
        with (self.work / f"reload-up-{self.starts}.log").open("w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        wait_until_answers(self.url + "/health")

    def stop(self) -> None:
        if self.process:
            stop(self.process, signal.SIGINT)

    def containers(self) -> dict[str, tuple[str, int | None]]:
        """Running models -> (container ID, host port), as Docker has them."""
        return {c.model: (c.id, c.host_port) for c in self.backend.list(self.instance) if c.running}


def remove_containers(instance: str) -> None:
    """Every container of the instance, whatever its state: what `up` left, if anything."""
    backend = DockerBackend()
    for container in backend.list(instance):
        backend.stop(container.id, 1)


def ask(url: str, model: str) -> None:
    httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model}, timeout=60).raise_for_status()


def published_port(url: str, model: str) -> int | None:
    running = httpx.get(url + "/running", timeout=10).json()["running"]
    return next((s["host_port"] for s in running if s["model"] == model), None)


def apply(up: RestartableUp, how: str) -> str:
    """Apply the file as `how` says; what went unexpectedly, if anything."""
    if how == "restart":
        up.stop()
        up.start()
        return ""
    answer = httpx.post(up.url + "/reload", timeout=60)
    answer.raise_for_status()
    changes = answer.json()
    expected = changes["replaced"] == ["e1"] and changes["unchanged"] == ["m1"]
    return "" if expected else f"the reload answered {changes}"


def change(up: RestartableUp, how: str, streaming: bool, settings: dict[str, Any], marker: int) -> Change:
    """Change e1's container in the file, apply it, ask e1; m1 streaming meanwhile if `streaming`."""
    settings["models"]["e1"]["environment"] = {"BENCH_CHANGE": str(marker)}
    up.config_path.write_text(json.dumps(settings))
    before = up.containers()
    with InFlight(up.url, "m1") if streaming else nullcontext() as in_flight:
        began = time.perf_counter()
        note = apply(up, how)
        in_force = time.perf_counter() - began
        ask(up.url, "e1")
        e1_new = time.perf_counter() - began
    after = up.containers()
    return Change(
        how,
        streaming,
        in_force,
        e1_new,
        e1_replaced=after["e1"][0] != before["e1"][0] and published_port(up.url, "e1") == after["e1"][1],
        m1_kept=after.get("m1", ("",))[0] == before["m1"][0],
        completed=in_flight.done and not in_flight.error if in_flight else None,
        ended_s=in_flight.ended_at - began if in_flight else None,
        note=note or (in_flight.error if in_flight else ""),
    )


def reload_settings(models: Path) -> dict[str, Any]:
    """proxy_bench's m1 and e1; m1 with a context long enough to stream for a few seconds
    (the tiny model declares 2048 tokens, which llama-server would cap each slot to)."""
    settings = config(models, f"bench-reload-{os.getpid()}")
    command = settings["models"]["m1"]["command"]
    command[command.index("-c") + 1] = str(IN_FLIGHT_TOKENS + 512)
    command += ["--override-kv", f"llama.context_length=int:{IN_FLIGHT_TOKENS + 512}", "-np", "1"]
    settings["models"]["e1"]["environment"] = {"BENCH_CHANGE": "0"}
    return settings


def measure_reload(models: Path, work: Path, runs: int) -> list[Change]:
    """Each kind of change `runs` times, their order rotating from run to run."""
    settings = reload_settings(models)
    up = RestartableUp(work / "reload.yaml", work, settings["instance"])
    up.config_path.write_text(json.dumps(settings))  # JSON is YAML
    changes: list[Change] = []
    try:
        up.start()
        ask(up.url, "m1")
        ask(up.url, "e1")
        for n in range(runs):
            for how, streaming in KINDS[n % 4 :] + KINDS[: n % 4]:
                changes.append(change(up, how, streaming, settings, len(changes) + 1))
            print(f"reload run {n + 1}/{runs}", file=sys.stderr)
    finally:
        up.stop()
        remove_containers(settings["instance"])
    return changes


def render_reload(changes: list[Change]) -> list[str]:
    kinds = [[c for c in changes if (c.how, c.streaming) == kind] for kind in KINDS]
    names = [
        f"{'`POST /reload`' if how == 'reload' else 'restart `up`'}{', m1 streaming' if s else ''}"
        for how, s in KINDS
    ]
    lines = [
        f"| e1 changed, {len(kinds[0])} runs each: median (range) | {' | '.join(names)} | restart / reload |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    timed: list[tuple[str, Callable[[Change], float | None]]] = [
        ("new config in force, ms (the reload's answer; the new `up` answering)", lambda c: c.in_force_s),
        ("a request to e1 answered by its new container, ms", lambda c: c.e1_new_s),
        ("m1's streamed request ended, ms", lambda c: c.ended_s),
    ]
    for label, value in timed:
        per_kind = [[v * 1e3 for c in kind if (v := value(c)) is not None] for kind in kinds]
        cells = [f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" if v else "-" for v in per_kind]
        over = ratio(median_of(list(per_kind[2])), median_of(list(per_kind[0])))
        lines.append(f"| {label} | {' | '.join(cells)} | {'-' if over is None else f'{over:.1f}x'} |")
    checks: list[tuple[str, Callable[[Change], bool | None]]] = [
        ("e1's container replaced (new ID, the one /running publishes)", lambda c: c.e1_replaced),
        ("m1's container kept (same ID)", lambda c: c.m1_kept),
        ("m1's streamed request completed", lambda c: c.completed),
        (
            "m1's stream still ran when e1's new container answered",
            lambda c: None if c.ended_s is None else c.ended_s > c.e1_new_s,
        ),
    ]
    for label, test in checks:
        cells = [count([test(c) for c in kind]) for kind in kinds]
        lines.append(f"| {label} | {' | '.join(cells)} | |")
    lines += [f"{c.how}{', m1 streaming' if c.streaming else ''}: {c.note}" for c in changes if c.note]
    return lines


def count(results: list[bool | None]) -> str:
    present = [r for r in results if r is not None]
    return f"{sum(present)}/{len(present)}" if present else "-"


# -- main ----------------------------------------------------------------------------------


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds of the page part (default 5)"
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="seconds per load phase (default 1.5)")
    parser.add_argument(
        "--idle-seconds", type=float, default=4, help="idle CPU read per condition and round (default 4)"
    )
    parser.add_argument(
        "--reload-runs", type=int, default=5, help="runs of each kind of change (default 5); 0 skips"
    )
    return parser.parse_args()


def measure_page_cost(loader: Path, work: Path, args: argparse.Namespace) -> list[Round]:
    settings = config(work / "models", f"bench-live-{os.getpid()}")
    config_path = work / "live.yaml"
    config_path.write_text(json.dumps(settings))
    try:
        with swapctl_up(config_path, work / "live-up.log") as (up, url), sync_playwright() as playwright:
            start_models(url)
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                return measure_page(loader, Target("swapctl", {"echo": url}, up.pid), browser, args)
            finally:
                browser.close()
    finally:
        remove_containers(settings["instance"])  # `up --stop-on-exit` stopped them, unless it failed


def main() -> None:
    args = arguments()
    began = time.perf_counter()
    loader, go_version = build_go()
    work = Path(tempfile.mkdtemp(prefix="swapctl-live-bench-"))
    (work / "models").mkdir()
    write_models(work / "models")
    load_before = load_average()
    rounds = measure_page_cost(loader, work, args)
    changes = measure_reload(work / "models", work, args.reload_runs) if args.reload_runs else []
    output = [
        machine(go_version),
        f"swapctl from {Path(swapctl.__file__).parent}",
        f"Load average (1, 5, 15 min): {load_before} before, {load_average()} after.",
        f"{args.rounds} interleaved rounds of 3 conditions x 2 workloads, {args.seconds:g} s each, "
        f"idle CPU over {args.idle_seconds:g} s; medians over rounds, ratios: median (range) of the rounds'.",
        "",
        *render_page(rounds),
        *(["", *render_reload(changes)] if changes else []),
        "",
        f"Run took {time.perf_counter() - began:.0f} s.",
    ]
    print("\n".join(output))
    if any(p.errors for r in rounds for p in r.phases.values()) or any(c.note for c in changes):
        print(f"logs of the swapctl processes: {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
