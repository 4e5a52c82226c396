"""The storm (tests/storm.py) against the real `swapctl up`, five llama-server models and
Docker as the witness: sixteen clients in the first second of a fresh `up`, through a matrix
that forbids most pairs, lose no request, never run a forbidden set, and leave nothing stuck.
With no matrix, a burst of 32 clients wedges nothing, and `swapctl down --timeout 2`, after
it or in the middle of it, is prompt and leaves no container behind.

`bench/storm_bench.py` runs the same storm many times and counts.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
from storm import Storm, run_storm, storm_config
from support import Proxy, containers

pytestmark = [pytest.mark.docker, pytest.mark.storm]

DOWN_WITHIN = 15.0  # seconds `swapctl down --timeout 2` may take
DOWN_GIVEN_UP = 45.0  # then it is killed
BURST = Storm(seed=7, clients=32, burst=16, seconds=6, matrix=False)


@dataclass(frozen=True)
class Down:
    """What one `swapctl down --timeout 2` did."""

    code: int
    seconds: float
    removed: int | None  # the count it printed
    output: str

    def check(self) -> None:
        assert self.code == 0, f"swapctl down: exit {self.code}\n{self.output}"
        assert self.seconds <= DOWN_WITHIN, f"swapctl down took {self.seconds:.1f}s"
        assert self.removed is not None, self.output


def down(proxy: Proxy) -> Down:
    argv = [
        sys.executable,
        "-m",
        "swapctl",
        "down",
        "--timeout",
        "2",
        "-c",
        str(proxy.config),
        "--url",
        proxy.url,
    ]
    began = time.monotonic()
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=DOWN_GIVEN_UP, check=False, cwd=proxy.workdir
        )
    except subprocess.TimeoutExpired:
        return Down(-1, time.monotonic() - began, None, f"no end after {DOWN_GIVEN_UP:g}s (killed)")
    said = re.search(r"removed (\d+) containers? of instance", done.stdout)
    output = f"{done.stdout}{done.stderr}".strip()
    return Down(done.returncode, time.monotonic() - began, int(said.group(1)) if said else None, output)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_storm_through_a_matrix_loses_no_request_and_leaves_nothing_stuck(
    seed: int, instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient
) -> None:
    proxy = Proxy(storm_config(tmp_path / "swapctl.yaml", instance, models_dir), instance, tmp_path)
    proxy.start()
    try:
        report = run_storm(Storm(seed=seed), proxy, docker_engine)
    finally:
        proxy.close()
    print(f"\n{report.summary()}")
    if report.failures:
        print(f"lost requests by message:\n{report.failures_by_message()}")
    assert not report.problems(), report.explain()
    assert report.completed >= report.sent // 2, report.explain()


def test_a_burst_without_a_matrix_wedges_nothing_and_down_is_prompt(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient
) -> None:
    config = storm_config(tmp_path / "swapctl.yaml", instance, models_dir, False, BURST.clients)
    proxy = Proxy(config, instance, tmp_path)
    proxy.start()
    try:
        report = run_storm(BURST, proxy, docker_engine)
        print(f"\n{report.summary()}")
        before = containers(docker_engine, instance, running_only=False)
        done = down(proxy)
        print(f"down: exit {done.code} in {done.seconds:.1f}s: {done.output}")
        after = containers(docker_engine, instance, running_only=False)
        states = {model: entry["state"] for model, entry in proxy.running().items()}
    finally:
        proxy.close()

    assert not report.problems(), report.explain()
    done.check()
    assert done.removed == len(before) >= 1, (done.output, before)
    assert not after, f"containers left after down: {after}"
    assert set(states.values()) == {"stopped"}, states


def test_down_in_the_middle_of_a_burst_is_prompt_and_wedges_nothing(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient
) -> None:
    """`down` two seconds into the burst, while requests wait for starts: it returns in time,
    every request ends (those it cut may fail: they are counted, not asserted), the proxy
    settles and serves again, and a second `down` leaves nothing."""
    config = storm_config(tmp_path / "swapctl.yaml", instance, models_dir, False, BURST.clients)
    proxy = Proxy(config, instance, tmp_path)
    proxy.start()
    cut: list[Down] = []
    cutter = threading.Timer(2.0, lambda: cut.append(down(proxy)))
    try:
        cutter.start()
        report = run_storm(BURST, proxy, docker_engine)
        cutter.join(60)
        print(f"\n{report.summary()}")
        if report.failures:
            print(f"requests the down cut, by message:\n{report.failures_by_message()}")
        print(
            "down in the burst: " + "; ".join(f"exit {d.code} in {d.seconds:.1f}s: {d.output}" for d in cut)
        )
        last = down(proxy)
        print(f"down after: exit {last.code} in {last.seconds:.1f}s: {last.output}")
        after = containers(docker_engine, instance, running_only=False)
    finally:
        cutter.cancel()
        proxy.close()

    assert not report.problems(count_lost=False), report.explain()
    assert len(cut) == 1, "swapctl down in the burst never returned"
    cut[0].check()
    last.check()
    assert not after, f"containers left after down: {after}"
