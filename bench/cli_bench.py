"""Time `swapctl` commands from start to exit, against the interpreter's own start; prints a
Markdown table.

Run: .venv/bin/python bench/cli_bench.py [ROUNDS]

Each command runs as a subprocess of this interpreter (`python -m swapctl ...`, as the
installed `swapctl` script does), from the repository root. The rounds are interleaved (one
run of each command per round, after one untimed round that warms the file cache), so a
noisy neighbour slows every command alike instead of one. `python -c pass` is the floor:
what no command can go below. CPU time (user + system, from the children's rusage) is
reported beside wall time: on a shared machine it moves less.

`status` is timed twice: against a `swapctl up` the bench starts on a free 127.0.0.1 port
(found through the state directory, as a user's `status` finds it), and with `--url` naming a
closed port, so that it falls back to reading the containers' labels from Docker (a
Docker engine must run).

Bytecode is cached, as for an installed swapctl (pip compiles it at install) or a checkout
run twice: the commands write their .pyc files into a temporary PYTHONPYCACHEPREFIX during
the warm-up round, even where PYTHONDONTWRITEBYTECODE is set (then every run would compile
every module it imports again, a cost no user pays).
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 15
GOAL_S = 0.3
FLOOR = "python -c pass"
CONFIG = "config.example.yaml"
CLOSED = "CLOSED_PORT"  # replaced by a port nothing listens on
COMMANDS: dict[str, list[str]] = {
    FLOOR: ["-c", "pass"],
    "swapctl --help": ["-m", "swapctl", "--help"],
    "swapctl --version": ["-m", "swapctl", "--version"],
    "swapctl validate -c config.example.yaml": ["-m", "swapctl", "validate", "-c", "config.example.yaml"],
    "swapctl plan tiny-big -c config.example.yaml --running tiny-chat --json": [
        "-m",
        "swapctl",
        "plan",
        "tiny-big",
        "-c",
        "config.example.yaml",
        "--running",
        "tiny-chat",
        "--json",
    ],
    "swapctl status -c config.example.yaml (a proxy answers)": ["-m", "swapctl", "status", "-c", CONFIG],
    "swapctl status -c config.example.yaml --url (no proxy: Docker)": [
        "-m",
        "swapctl",
        "status",
        "-c",
        CONFIG,
        "--url",
        f"http://127.0.0.1:{CLOSED}",
    ],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def proxy(env: dict[str, str]) -> Iterator[None]:
    """A `swapctl up` of the example config on a free port, owning its instance in env's state
    directory, until the block ends."""
    port = free_port()
    argv = [sys.executable, "-m", "swapctl", "up", "-c", CONFIG, "--listen", f"127.0.0.1:{port}"]
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/running", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"swapctl up did not answer on port {port}")
                time.sleep(0.1)
        yield
    finally:
        process.terminate()
        process.wait(timeout=30)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of `python ARGV` from spawn to exit; a failing command stops the bench."""
    cpu, start = children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"python {' '.join(argv)} failed ({done.returncode}): {done.stderr.decode()}")
    return elapsed, children_cpu() - cpu


def measure(rounds: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) of every command, one of each per round, the first round thrown away."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
    closed = str(free_port())
    with tempfile.TemporaryDirectory(prefix="swapctl-bench-") as scratch:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(Path(scratch) / "pycache")
        env["SWAPCTL_STATE_DIR"] = str(Path(scratch) / "state")
        env.pop("SWAPCTL_URL", None)
        with proxy(env):
            for round_ in range(rounds + 1):
                for name, argv in COMMANDS.items():
                    sample = timed([arg.replace(CLOSED, closed) for arg in argv], env)
                    if round_:
                        samples[name].append(sample)
    return samples


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, len(ordered) * 9 // 10)]


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS
    print(f"Machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"Python {platform.python_implementation()} {sys.version.split()[0]}")
    print(f"{rounds} interleaved rounds; wall time of each command as a subprocess")
    print()
    samples = measure(rounds)
    floor = statistics.median(wall for wall, _ in samples[FLOOR])
    header = ["command", "median s", "p90 s", "x floor", "CPU median s", f"<= {GOAL_S} s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    for name, pairs in samples.items():
        walls = [wall for wall, _ in pairs]
        median, cpu = statistics.median(walls), statistics.median(c for _, c in pairs)
        goal = "-" if name == FLOOR else ("yes" if median <= GOAL_S else "no")
        row = [f"`{name}`", f"{median:.3f}", f"{p90(walls):.3f}", f"{median / floor:.1f}", f"{cpu:.3f}", goal]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
