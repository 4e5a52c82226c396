"""The latency one peer hop adds: a chat sent to a front `swapctl up` that routes it to a peer
(another `swapctl up`, as on another machine) against the same chat sent to the peer itself,
in one run; and how long the front takes to notice a peer that stops answering, and to take
it back.

Run (as root): .venv/bin/python bench/peer_bench.py [--rounds 7] [--requests 200] [--faults 5]
Needs the Docker engine and image (`make images`) and the hosts packages of scripts/hosts.sh
(iproute2, nsenter, iptables). About three minutes on 2 cores.

The rig is the two boxes of tests/real/test_two_boxes.py (tests/peers.py): the front on this
machine, the peer in a network namespace of its own driving a second dockerd there, reached
over a veth pair. The peer's model `big` (a tiny llama-server) is loaded once; then each round
sends `--requests` sequential plain chat completions (max_tokens 1, so the model's own work
is small and the hops' share shows) from one keep-alive HTTP client to each target, the
targets' order alternating from round to round:

- direct: the peer (peer -> container);
- front: the front, one hop more (front -> peer -> container).

And the same for a streamed chat: the time to the first body byte, each on a new connection
(llama-server closes its own after a stream). A figure is the median over rounds of each
round's median; "added" is the front's minus direct's in the same round (their median),
"ratio" the front's over direct's.

Then `--faults` times: the peer's `swapctl up` stopped (SIGSTOP: connections accepted,
nothing answered) until the front's GET /v1/models shows `big` unloaded ("noticed"), then
continued (SIGCONT) until it shows `big` loaded again ("taken back"), polled every 50 ms;
medians and ranges over the runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import docker
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import timing  # noqa: E402
from peers import IMAGE, Boxes, poll, two_boxes  # noqa: E402
from storm_bench import write_models  # noqa: E402
from timing import median_ms, print_comparison  # noqa: E402

import swapctl  # noqa: E402

CHAT = {"model": "big", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}


def plain(client: httpx.Client, base: str) -> float:
    began = time.perf_counter()
    answer = client.post(f"{base}/v1/chat/completions", json=CHAT)
    took = time.perf_counter() - began
    assert answer.status_code == 200 and answer.json()["choices"], answer.text
    return took


def first_byte(client: httpx.Client, base: str) -> float:
    return timing.first_byte(client, f"{base}/v1/chat/completions", {**CHAT, "stream": True}, {})


def latencies(boxes: Boxes, rounds: int, requests: int) -> dict[str, dict[str, list[float]]]:
    """Per workload and target, each round's median in ms."""
    targets = {"direct": boxes.b.url, "front": boxes.a.url}
    rows: dict[str, dict[str, list[float]]] = {"plain": {}, "first byte": {}}
    with httpx.Client(timeout=60) as client:
        for base in targets.values():  # warm both paths' connections
            median_ms(plain, client, base, 20)
        for number in range(rounds):
            order = list(targets) if number % 2 == 0 else list(reversed(targets))
            for workload, measure in (("plain", plain), ("first byte", first_byte)):
                for name in order:
                    ms = median_ms(measure, client, targets[name], requests)
                    rows[workload].setdefault(name, []).append(ms)
    return rows


def faults(boxes: Boxes, runs: int) -> tuple[list[float], list[float]]:
    """Seconds until the front showed the stopped peer's model unloaded, and loaded again
    once the peer was continued."""
    noticed: list[float] = []
    back: list[float] = []
    for _ in range(runs):
        poll(lambda: boxes.a.models().get("big") == "loaded", 30, "the front shows big loaded")
        os.kill(boxes.b.pid, signal.SIGSTOP)
        try:
            noticed.append(
                poll(lambda: boxes.a.models().get("big") == "unloaded", 60, "the front notices the peer")
            )
        finally:
            os.kill(boxes.b.pid, signal.SIGCONT)
        back.append(poll(lambda: boxes.a.models().get("big") == "loaded", 60, "the front takes it back"))
    return noticed, back


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=200, help="per target and workload in a round")
    parser.add_argument("--faults", type=int, default=5, help="stop-and-continue runs of the peer")
    args = parser.parse_args()
    engine = docker.from_env(version="auto", timeout=60)
    engine.images.get(IMAGE)
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as folder:
        Path(folder).chmod(0o755)
        models = write_models(Path(folder) / "models")
        with two_boxes(engine, models, Path(folder)) as boxes:
            with httpx.Client(timeout=120) as client:
                plain(client, boxes.a.url)  # starts big on the peer, through the front
            assert boxes.running_there() == {"big"} and boxes.running_here() == frozenset()
            where = Path(swapctl.__file__).parent.parent
            print(f"swapctl from {where}; {args.rounds} rounds x {args.requests} requests", flush=True)
            rows = latencies(boxes, args.rounds, args.requests)
            assert boxes.running_there() == {"big"} and boxes.running_here() == frozenset()
            print(f"{args.faults} runs of the peer stopped and continued", flush=True)
            noticed, back = faults(boxes, args.faults)
    engine.close()
    print_comparison(rows, "front")
    print(f"peer stopped, noticed after s: {spread(noticed)}")
    print(f"peer continued, taken back after s: {spread(back)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
