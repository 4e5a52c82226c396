"""The promises across restarts and faults, on real Docker through a real `swapctl up`: the
matrix holds when a config edit forbids what runs, one `up` per instance, adopted containers
are health-checked, and `down` with a stream in flight keeps its timeout and counts right."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from support import (
    Proxy,
    Streamed,
    ask,
    config_document,
    free_port,
    llama_model,
    long_model,
    poll,
    running_models,
    stream_chat,
    write_yaml,
)

pytestmark = pytest.mark.docker


def config(instance: str, models_dir: Path, sets: dict[str, str], **extra: Any) -> dict[str, Any]:
    models = {"a": llama_model(models_dir, 1), "b": llama_model(models_dir, 2), **extra}
    return config_document(instance, models, {"sets": sets, "evict_costs": {"b": 5}})


def test_a_restart_under_a_config_that_forbids_what_runs_keeps_the_matrix(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient, proxies: list[Proxy]
) -> None:
    path = write_yaml(tmp_path / "swapctl.yaml", config(instance, models_dir, {"pair": "a & b"}))
    proxy = Proxy(path, instance, tmp_path)
    proxies.append(proxy)
    proxy.start()
    ask(proxy, "a")
    ask(proxy, "b")
    assert running_models(docker_engine, instance) == {"a", "b"}
    proxy.stop(signal.SIGINT)  # the containers keep running, for the next `up` to adopt

    write_yaml(path, config(instance, models_dir, {"only_a": "a", "only_b": "b"}))
    proxy.start()  # answers /health only after adoption
    assert running_models(docker_engine, instance) == {"b"}  # b costs more to lose: it stays
    assert "stopping a: the policy does not allow it beside b" in proxy.log()
    ask(proxy, "b")
    ask(proxy, "a")
    assert running_models(docker_engine, instance) == {"a"}


def test_a_second_up_for_the_same_instance_refuses_and_names_the_first(
    instance: str, models_dir: Path, tmp_path: Path, proxies: list[Proxy]
) -> None:
    path = write_yaml(tmp_path / "swapctl.yaml", config(instance, models_dir, {"pair": "a & b"}))
    first = Proxy(path, instance, tmp_path)
    proxies.append(first)
    first.start()
    argv = [sys.executable, "-m", "swapctl", "up", "-c", str(path), "--listen", f"127.0.0.1:{free_port()}"]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert second.returncode == 1, second.stderr
    assert f"instance '{instance}' is already served by swapctl up at {first.url}" in second.stderr
    assert "Traceback" not in second.stderr
    # other commands find the owner without being told its address
    status = subprocess.run(
        [sys.executable, "-m", "swapctl", "status", "-c", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert status.returncode == 0, status.stderr
    assert '"source": "proxy"' in status.stdout
    first.stop(signal.SIGKILL)  # however the owner ends, the instance is free again
    first.start()


def test_a_model_still_loading_when_up_was_killed_is_adopted_as_starting(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient, proxies: list[Proxy]
) -> None:
    slow = {
        **llama_model(models_dir, 3),
        "entrypoint": ["sh", "-c", 'sleep 3 && exec llama-server "$$@"', "llama-server"],
    }
    path = write_yaml(tmp_path / "swapctl.yaml", config(instance, models_dir, {"pair": "a & b"}, slow=slow))
    proxy = Proxy(path, instance, tmp_path)
    proxies.append(proxy)
    proxy.start()

    def cut_off_by_the_kill() -> None:
        with contextlib.suppress(httpx.TransportError):
            stream_chat(proxy.url, "slow", 4, timeout=30)

    waiting = threading.Thread(target=cut_off_by_the_kill, daemon=True)
    waiting.start()
    poll(lambda: "slow" in running_models(docker_engine, instance), 20, "the slow model's container to run")
    proxy.stop(signal.SIGKILL)  # while it loads
    proxy.start()
    assert proxy.running()["slow"]["state"] == "starting"
    ask(proxy, "slow")  # joins the start: answered once healthy, never a 503
    assert proxy.running()["slow"]["state"] == "ready"
    assert "adopting slow" in proxy.log()


def test_down_with_a_stream_in_flight_keeps_its_timeout_and_counts_every_container(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient, proxies: list[Proxy]
) -> None:
    raw = config(instance, models_dir, {"trio": "a & b & long"}, long=long_model(models_dir, 3))
    path = write_yaml(tmp_path / "swapctl.yaml", raw)
    proxy = Proxy(path, instance, tmp_path)
    proxies.append(proxy)
    proxy.start()
    ask(proxy, "a")
    ask(proxy, "b")
    streaming = threading.Event()
    streamed: list[Streamed] = []

    def note(progress: Streamed) -> bool:
        streaming.set()
        return True

    # about 38 s of tokens on a 2-core machine if nothing stops it
    thread = threading.Thread(
        target=lambda: streamed.append(stream_chat(proxy.url, "long", 16000, on_event=note, timeout=120)),
        daemon=True,
    )
    thread.start()
    assert streaming.wait(30)
    down = proxy.swapctl("down", "--timeout", "1")
    assert f"removed 3 containers of instance {instance}" in down.stdout
    assert running_models(docker_engine, instance) == frozenset()
    thread.join(30)
    assert streamed and not streamed[0].done  # cut after the timeout, not run to its end
    assert streamed[0].error is not None  # and the client is told why
    assert "Traceback" not in proxy.log()
