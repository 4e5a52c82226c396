"""The commands that reach the container engine (status, plan, unload, down, logs), run on
the fake backend: no Docker. `--url` points where no proxy listens, so they read the
containers' labels; a tiny HTTP server stands in for the proxy where one answers."""

from __future__ import annotations

import contextlib
import json
import socket
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from support import config_file, json_server, run_cli

from swapctl.backend import Backend
from swapctl.backend.fake import FakeBackend
from swapctl.config import Config, load_config
from swapctl.spec import build_spec

CONFIG = """
instance: cli-test
models:
  a: {image: x, aliases: [alpha], stop_grace_period: 1s}
  b: {image: x}
  c: {image: x}
"""


@dataclass
class World:
    path: Path
    config: Config
    backend: FakeBackend

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        """`swapctl ARGV -c CONFIG`: its exit code, stdout and stderr."""
        return run_cli(capsys, lambda: self.backend, *argv, "-c", str(self.path))

    def container_id(self, model: str) -> str:
        return next(c.id for c in self.backend.list(self.config.instance) if c.model == model)


def no_backend() -> Backend:
    raise AssertionError("the command asked for the engine although the proxy answered")


def start(backend: FakeBackend, config: Config, *models: str) -> None:
    for model in models:
        backend.start(build_spec(config, model))


@pytest.fixture
def no_proxy() -> str:
    """A URL on 127.0.0.1 where nothing listens: the commands fall back to Docker's labels."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def world(tmp_path: Path) -> World:
    """Instance `cli-test` running a and b, beside instance `other` running its own a."""
    path = config_file(tmp_path, CONFIG)
    config = load_config(path)
    backend = FakeBackend()
    start(backend, config, "a", "b")
    (tmp_path / "other.yaml").write_text(CONFIG.replace("cli-test", "other"))
    start(backend, load_config(tmp_path / "other.yaml"), "a")
    return World(path, config, backend)


# --- from the containers' labels, no proxy --------------------------------------------------


def test_status_json_from_labels(capsys: pytest.CaptureFixture[str], world: World, no_proxy: str) -> None:
    code, out, err = world.run(capsys, "status", "--url", no_proxy, "--json")
    assert (code, err) == (0, "")
    answer = json.loads(out)
    assert answer["source"] == "docker"
    by_model = {m["model"]: m for m in answer["models"]}
    assert list(by_model) == ["a", "b", "c"]
    running = {c.model: c for c in world.backend.list("cli-test")}
    for model in ("a", "b"):
        assert by_model[model]["state"] == "running"
        assert by_model[model]["container"] == running[model].name
        assert by_model[model]["host_port"] == running[model].host_port
        assert 0 <= by_model[model]["ready_seconds"] < 60
    assert by_model["c"] == {
        "model": "c",
        "state": "stopped",
        "container": None,
        "host_port": None,
        "in_flight": None,
        "ready_seconds": None,
        "idle_seconds": None,
        "gpus": None,
    }


def test_status_table_from_labels(
    capsys: pytest.CaptureFixture[str], world: World, no_proxy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one row per model, no folded cells
    code, out, _ = world.run(capsys, "status", "--url", no_proxy)
    assert code == 0
    assert "swapctl cli-test: models from Docker (no proxy answers)" in out
    rows = {line.split()[1]: line for line in out.splitlines() if line.split()[1:2] in (["a"], ["b"], ["c"])}
    assert "running" in rows["a"] and "running" in rows["b"]
    assert "stopped" in rows["c"]
    for model in ("a", "b"):
        container = next(c for c in world.backend.list("cli-test") if c.model == model)
        assert container.name in rows[model] and str(container.host_port) in rows[model]


def test_plan_reads_what_runs_from_labels(
    capsys: pytest.CaptureFixture[str], world: World, no_proxy: str
) -> None:
    code, out, _ = world.run(capsys, "plan", "c", "--url", no_proxy, "--json")
    assert code == 0
    assert json.loads(out)["evict"] == ["a", "b"]  # no matrix: one model at a time


def test_unload_one_without_a_proxy_stops_its_container(
    capsys: pytest.CaptureFixture[str], world: World, no_proxy: str
) -> None:
    code, out, _ = world.run(capsys, "unload", "alpha", "--url", no_proxy)
    assert (code, out) == (0, "unloaded: a\n")
    assert {c.model for c in world.backend.list("cli-test")} == {"b"}
    assert {c.model for c in world.backend.list("other")} == {"a"}


def test_unload_all_without_a_proxy(capsys: pytest.CaptureFixture[str], world: World, no_proxy: str) -> None:
    assert world.run(capsys, "unload", "--url", no_proxy)[:2] == (0, "unloaded: a, b\n")
    assert world.backend.list("cli-test") == []
    assert {c.model for c in world.backend.list("other")} == {"a"}
    assert world.run(capsys, "unload", "--url", no_proxy)[:2] == (0, "unloaded: nothing was running\n")


def test_down_removes_every_container_of_the_instance_only(
    capsys: pytest.CaptureFixture[str], world: World, no_proxy: str
) -> None:
    world.backend.crash("b")  # an exited container is removed too
    code, out, _ = world.run(capsys, "down", "--url", no_proxy)
    assert (code, out) == (0, "removed 2 containers of instance cli-test\n")
    assert world.backend.list("cli-test") == []
    assert {c.model for c in world.backend.list("other")} == {"a"}
    start(world.backend, world.config, "c")
    assert world.run(capsys, "down", "--url", no_proxy)[1] == "removed 1 container of instance cli-test\n"
    assert world.run(capsys, "down", "--url", no_proxy)[1] == "removed 0 containers of instance cli-test\n"


def test_logs_prints_the_container_logs(capsys: pytest.CaptureFixture[str], world: World) -> None:
    world.backend.boxes[world.container_id("a")].log.extend(["loading", "listening on 8080"])
    assert world.run(capsys, "logs", "alpha") == (0, "loading\nlistening on 8080", "")
    assert world.run(capsys, "logs", "a", "--tail", "1")[1] == "listening on 8080"
    world.backend.crash("a")  # a followed log ends when its container stops
    assert world.run(capsys, "logs", "a", "-f")[1] == "loading\nlistening on 8080\n"


def test_logs_of_a_model_without_a_container(capsys: pytest.CaptureFixture[str], world: World) -> None:
    assert world.run(capsys, "logs", "c") == (
        1,
        "",
        "error: model 'c' has no container (it is not running)\n",
    )
    code, _, err = world.run(capsys, "logs", "nope")
    assert code == 2
    assert err.startswith("error: unknown model 'nope'")


# --- from a proxy ---------------------------------------------------------------------------


def fake_proxy(answers: dict[str, Any], seen: list[str]) -> contextlib.AbstractContextManager[str]:
    """An HTTP server on 127.0.0.1 that answers `METHOD PATH` from `answers` and records each."""

    def answer(request: BaseHTTPRequestHandler) -> object:
        seen.append(f"{request.command} {request.path}")
        return answers[f"{request.command} {request.path}"]

    return json_server(answer)


def test_status_from_the_proxy(capsys: pytest.CaptureFixture[str], world: World) -> None:
    model = {"model": "a", "state": "ready", "container": "box-a", "host_port": 40001}
    model |= {"in_flight": 2, "ready_seconds": 75.0, "idle_seconds": 0.5}
    seen: list[str] = []
    with fake_proxy({"GET /running": {"running": ["a"], "models": [model]}}, seen) as url:
        code, out, _ = run_cli(capsys, no_backend, "status", "-c", str(world.path), "--url", url, "--json")
        assert code == 0
        assert json.loads(out) == {"source": "proxy", "models": [model]}
        code, out, _ = run_cli(capsys, no_backend, "status", "-c", str(world.path), "--url", url)
    assert code == 0
    assert "models from the proxy" in out
    assert "box-a" in out and "1m15s" in out
    assert seen == ["GET /running", "GET /running"]


def test_reload_asks_the_proxy_and_says_what_changed(
    capsys: pytest.CaptureFixture[str], world: World, no_proxy: str
) -> None:
    seen: list[str] = []
    changes = {
        "added": ["c"],
        "removed": [],
        "replaced": ["b"],
        "unchanged": ["a"],
        "needs_restart": ["listen"],
    }
    with fake_proxy({"POST /reload": changes}, seen) as url:
        code, out, _ = world.run(capsys, "reload", "--url", url)
    assert seen == ["POST /reload"]
    assert code == 0
    assert out == (
        "reloaded: added: c; removed: -; replaced: b; unchanged: 1; "
        "not applied until swapctl up restarts: listen\n"
    )
    code, _, err = world.run(capsys, "reload", "--url", no_proxy)
    assert code == 1
    assert "no swapctl up answers for instance 'cli-test'" in err


def test_unload_through_the_proxy(capsys: pytest.CaptureFixture[str], world: World) -> None:
    seen: list[str] = []
    with fake_proxy({"POST /unload/a": {"unloaded": ["a"]}}, seen) as url:
        code, out, _ = run_cli(capsys, no_backend, "unload", "alpha", "-c", str(world.path), "--url", url)
    assert (code, out) == (0, "unloaded: a\n")
    assert seen == ["POST /unload/a"]  # by its model ID; the proxy stops it, not the CLI
    assert {c.model for c in world.backend.list("cli-test")} == {"a", "b"}
