"""Live state on real Docker, through a real `swapctl up`: a model container's log followed at
/logs/<model>/stream (lines written after the client connected included), the Docker stream
closed when the client leaves, and `up` stopping cleanly with event and log streams open."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
from support import Proxy, containers, llama_model, write_yaml

pytestmark = pytest.mark.docker


def until(lines: Iterator[str], wanted: str) -> str:
    """The first line containing `wanted`; fails if the stream ends first."""
    for line in lines:
        if wanted in line:
            return line
    pytest.fail(f"the log ended before a line with {wanted!r}", pytrace=False)


def write_to_log(engine: docker.DockerClient, container_id: str, line: str) -> None:
    """A line in the container's log, as its server would write one (to PID 1's stdout)."""
    done = engine.containers.get(container_id).exec_run(["sh", "-c", f"echo {line} > /proc/1/fd/1"])
    assert done.exit_code == 0, done.output


def test_a_models_log_is_followed_live_and_up_stops_with_streams_open(
    instance: str, models_dir: Path, tmp_path: Path, proxies: list[Proxy], docker_engine: docker.DockerClient
) -> None:
    config = {"instance": instance, "models": {"a": llama_model(models_dir, 1)}}
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)
    proxies.append(proxy)
    proxy.start()
    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        refused = http.get("/logs/a/stream")
        assert refused.status_code == 409
        assert "model 'a' is not running" in refused.json()["error"]["message"]
        loaded = http.post("/load/a").json()
        assert (loaded["model"], loaded["state"]) == ("a", "ready")
        with http.stream("GET", "/logs/a/stream") as followed:
            lines = followed.iter_lines()
            until(lines, "llama_server: initializing")  # from the start of its log
            write_to_log(docker_engine, containers(docker_engine, instance)["a"], "written-after-connecting")
            until(lines, "written-after-connecting")
        # the client left: the proxy closed the Docker stream (a new follow still works)
        with (
            http.stream("GET", "/events") as events,
            http.stream("GET", "/logs/a/stream") as followed,
            http.stream("GET", "/logs/stream") as proxy_log,
        ):
            streams = [response.iter_lines() for response in (events, followed, proxy_log)]
            assert next(streams[0]) == "event: snapshot"
            until(streams[1], "llama_server: initializing")
            assert next(streams[2])
            assert proxy.stop(signal.SIGINT) == 130  # ended as Ctrl-C ends it, not killed
            for lines in streams:
                for _ in lines:  # each ends whole: a stream cut off would raise
                    pass
    assert "timeout graceful shutdown exceeded" not in proxy.log()
