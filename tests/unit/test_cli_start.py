"""What a command costs to start: what it loads, each command in a fresh interpreter here,
compared with what it needs (test_cli.py holds the quick commands to the same rule for
Docker, HTTP, the proxy and rich), and the garbage collection the program starts without."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SEED = str(Path(__file__).parents[1] / "configs" / "seed.yaml")
NEVER = {"paramiko", "invoke", "httpx", "starlette", "uvicorn"}  # no command below uses them
PROBE = """
import sys
from swapctl.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("loaded:", *sorted({m.split(".")[0] for m in sys.modules}), file=sys.stderr)
"""


def loaded_by(*argv: str) -> set[str]:
    """The top-level packages loaded once `swapctl ARGV` ends, in an interpreter of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "SWAPCTL_URL")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=False, env=env
    )
    last = done.stderr.splitlines()[-1]
    assert last.startswith("loaded:"), done.stderr
    return set(last.split()[1:])


@pytest.mark.parametrize("argv", [["--version"], ["--help"]])
def test_version_and_help_load_neither_pydantic_nor_rich(argv: list[str]) -> None:
    found = loaded_by(*argv)
    assert "swapctl" in found
    assert found.isdisjoint({"pydantic", "yaml", "rich", "docker", "requests", *NEVER}), found


def test_status_from_docker_loads_the_sdk_without_its_ssh_transport() -> None:
    """No proxy answers on port 9: the containers' labels come from the local engine (or,
    without one, an error), through the SDK, which loads paramiko only for an ssh:// engine."""
    found = loaded_by("status", "-c", SEED, "--url", "http://127.0.0.1:9")
    assert "docker" in found
    assert found.isdisjoint({*NEVER, "asyncio"}), found  # it awaits nothing: no event loop's modules


SSH_PROBE = """
import sys
from swapctl.backend.docker import DockerBackend
from swapctl.config.hosts import Engine
from swapctl.errors import DaemonUnavailable

print("paramiko at import:", "paramiko" in sys.modules)
try:
    DockerBackend(Engine(name="far", docker="ssh://nobody@127.0.0.1:9", timeout=3)).list("x")
except DaemonUnavailable as error:
    print(error)
"""


def test_an_ssh_engine_loads_the_ssh_transport_when_it_connects() -> None:
    """The SDK loaded without paramiko still reaches an ssh:// engine: the connection is
    paramiko's (its own words for a closed port), not the SDK's "Install paramiko"."""
    done = subprocess.run([sys.executable, "-c", SSH_PROBE], capture_output=True, text=True, check=False)
    at_import, error = done.stdout.splitlines()
    assert at_import == "paramiko at import: False"
    assert error.startswith("cannot reach the Docker engine of host 'far' (ssh://nobody@127.0.0.1:9): ")
    assert "Unable to connect to port 9 on 127.0.0.1" in error, error
    assert "Install paramiko" not in error


GC_PROBE = """
import gc, time
from swapctl import cli

def command():
    print("at start:", gc.isenabled())
    deadline = time.monotonic() + 30  # a second, on a machine however loaded
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.05)
    print("later:", gc.isenabled())

cli.main = command
cli.run()
"""


def test_the_program_collects_garbage_once_a_command_runs_long() -> None:
    """Off while a command starts, the collector is on again for one that keeps running."""
    done = subprocess.run([sys.executable, "-c", GC_PROBE], capture_output=True, text=True, check=False)
    assert done.stdout.splitlines() == ["at start: False", "later: True"], done.stderr
