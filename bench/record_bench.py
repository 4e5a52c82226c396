"""What every request on record costs swapctl's proxy: its CPU per request with the record
off, on, and on with captures, in one run.

Run: .venv/bin/python bench/record_bench.py [--rounds 5] [--seconds 1.5]
(needs what bench/proxy_bench.py needs, whose config, Go load generator and phases it reuses).
About a minute and a half on 2 cores.

Three `swapctl up` run side by side, each with its own two containers (llama-server with a
tiny model, m1, and scripts/echo_server.py, e1), alike but for two keys:

- off: `requestRecord: 0`;
- record: `requestRecord: 1000` (the default);
- captures: `requestRecord: 1000`, `captureBuffer: 64` (MB), every body captured;
- record, /events read: as record, with one raw `GET /events` reader (a thread reading the
  stream with httpx) throughout: a `request` event for every request.

In each round, the conditions' order rotating, the Go load generator runs on each: plain chat
completions to e1 with 32 clients, and streamed chat completions to m1 (llama-server, about
60 events each) with 1 client. Figures: the proxy's CPU per request (utime+stime of its
process from /proc/PID/stat, over the measured part) and requests/s, each the median over
rounds; a condition's ratio to "off" is the median of the rounds' ratios, with the lowest and
highest round's in brackets.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import uuid
from contextlib import ExitStack
from pathlib import Path

import httpx
import yaml

# bench/ is on sys.path when this file runs as a script: the shared parts come from there
from proxy_bench import (
    CHAT,
    Phase,
    Target,
    Workload,
    build_go,
    config,
    machine,
    median_of,
    run_phase,
    swapctl_up,
    write_models,
)

CONDITIONS = {
    "off": {"requestRecord": 0},
    "record": {"requestRecord": 1000},
    "captures": {"requestRecord": 1000, "captureBuffer": 64},
    "record, /events read": {"requestRecord": 1000},
}
READ = "record, /events read"  # the condition whose proxy has an /events reader throughout
WORKLOADS = [
    Workload("echo plain x32", "echo", "/v1/chat/completions", {**CHAT, "model": "e1"}, 32, False),
    Workload(
        "llama stream x1",
        "llama",
        "/v1/chat/completions",
        {**CHAT, "model": "m1", "stream": True, "max_tokens": 60},
        1,
        False,
    ),
]


def cpu_ms(phase: Phase) -> float | None:
    answered = len(phase.latencies)
    return None if phase.cpu_seconds is None or not answered else 1000 * phase.cpu_seconds / answered


def read_events(url: str, seen: list[int], stop: threading.Event) -> None:
    """Read `/events` until `stop`, counting the `request` events in `seen[0]`."""
    with (
        httpx.Client(timeout=httpx.Timeout(10, read=60)) as client,
        client.stream("GET", url + "/events") as stream,
    ):
        for line in stream.iter_lines():
            if line == "event: request":
                seen[0] += 1
            if stop.is_set():
                return


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    loader, go_version = build_go()
    work = Path(tempfile.mkdtemp(prefix="swapctl-record-bench-"))
    models = work / "models"
    models.mkdir()
    write_models(models)
    with ExitStack() as stack:
        targets: list[Target] = []
        seen = [0]  # request events the /events reader read
        for number, (name, keys) in enumerate(CONDITIONS.items()):
            path = work / f"c{number}.yaml"
            path.write_text(yaml.safe_dump({**config(models, f"rb{number}-{uuid.uuid4().hex[:6]}"), **keys}))
            up, url = stack.enter_context(swapctl_up(path, work / f"c{number}.log"))
            targets.append(Target(name, {"echo": url, "llama": url}, up.pid))
            if name == READ:
                stop = threading.Event()
                stack.callback(stop.set)
                threading.Thread(target=read_events, args=(url, seen, stop), daemon=True).start()
        for target in targets:  # start the models, and warm up
            for workload in WORKLOADS:
                run_phase(loader, target, workload, 0.5)
        phases: dict[tuple[str, str], list[Phase]] = {}
        for number in range(args.rounds):
            order = targets[number % len(targets) :] + targets[: number % len(targets)]
            for workload in WORKLOADS:
                for target in order:
                    phase = run_phase(loader, target, workload, args.seconds)
                    if phase.errors:
                        raise RuntimeError(f"{target.name}, {workload.key}: {phase.first_error}")
                    phases.setdefault((workload.key, target.name), []).append(phase)
    print(f"{machine(go_version)}; {args.rounds} rounds of {args.seconds:g}s")
    print(f"the /events reader read {seen[0]} request events\n")
    print("| workload | condition | CPU ms / request | vs off | requests/s |")
    print("|---|---|---|---|---|")
    for workload in WORKLOADS:
        base = phases[workload.key, "off"]
        for name in CONDITIONS:
            runs = phases[workload.key, name]
            cpu = median_of([cpu_ms(p) for p in runs])
            ratios = sorted(
                c / b for c, b in ((cpu_ms(p), cpu_ms(q)) for p, q in zip(runs, base, strict=True)) if c and b
            )
            versus = (
                ""
                if name == "off" or not ratios
                else f"{median_of(list(ratios)):.2f}x [{ratios[0]:.2f}-{ratios[-1]:.2f}]"
            )
            rate = median_of([p.rate for p in runs])
            print(f"| {workload.key} | {name} | {cpu:.3f} | {versus} | {rate:.0f} |")


if __name__ == "__main__":
    main()
