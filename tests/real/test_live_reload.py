"""Reload without restart, on real Docker through a real `swapctl up`: an edit seen by
`--watch-config` replaces the changed model only once its stream has finished, keeps the
unchanged one's container, adds a model; SIGHUP reloads; a bad edit keeps the old config."""

from __future__ import annotations

import signal
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
    containers,
    llama_model,
    long_model,
    poll,
    running_models,
    stream_chat,
    write_yaml,
)

pytestmark = pytest.mark.docker
STREAM_TOKENS = 4000  # about 10 s on a 2-core machine: the reload lands mid-stream


def config(instance: str, models_dir: Path, **models: dict[str, Any]) -> dict[str, Any]:
    models = {"a": llama_model(models_dir, 1), "long": long_model(models_dir, 3), **models}
    return config_document(instance, models, {"sets": {"pair": "a & long"}})


def model_ids(proxy: Proxy) -> list[str]:
    return [m["id"] for m in httpx.get(f"{proxy.url}/v1/models", timeout=10).json()["data"]]


def test_an_edit_seen_by_watch_config_replaces_a_changed_model_after_its_stream(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient, proxies: list[Proxy]
) -> None:
    path = write_yaml(tmp_path / "swapctl.yaml", config(instance, models_dir))
    proxy = Proxy(path, instance, tmp_path, args=("--watch-config",))
    proxies.append(proxy)
    proxy.start()
    ask(proxy, "a")
    ask(proxy, "long")
    before = containers(docker_engine, instance)
    streaming = threading.Event()
    streamed: list[Streamed] = []

    def note(progress: Streamed) -> bool:
        streaming.set()
        return True

    thread = threading.Thread(
        target=lambda: streamed.append(
            stream_chat(proxy.url, "long", STREAM_TOKENS, on_event=note, timeout=120)
        ),
        daemon=True,
    )
    thread.start()
    assert streaming.wait(30)
    changed = long_model(models_dir, 3)
    changed["environment"] = {**changed["environment"], "RELOADED": "1"}
    write_yaml(path, config(instance, models_dir, long=changed, c=llama_model(models_dir, 2)))
    summary = "reload (the file changed): added: c; removed: -; replaced: long; unchanged: 1"
    poll(lambda: summary in proxy.log(), 15, "the watcher's reload")
    assert "c" in model_ids(proxy)
    assert thread.is_alive(), "the stream ended before the reload: nothing was in flight"
    assert containers(docker_engine, instance)["long"] == before["long"]  # still serving its stream
    thread.join(120)
    assert streamed[0].done and streamed[0].error is None  # never cut
    poll(lambda: "long" not in running_models(docker_engine, instance), 15, "the old container to stop")
    assert containers(docker_engine, instance)["a"] == before["a"]  # unchanged: untouched
    ask(proxy, "long")
    after = containers(docker_engine, instance)
    assert after["long"] != before["long"] and after["a"] == before["a"]
    environment = docker_engine.containers.get(after["long"]).attrs["Config"]["Env"]
    assert "RELOADED=1" in environment
    assert "Traceback" not in proxy.log()


def test_sighup_reloads_and_a_bad_edit_keeps_the_old_config(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient, proxies: list[Proxy]
) -> None:
    raw = config(instance, models_dir)
    path = write_yaml(tmp_path / "swapctl.yaml", raw)
    proxy = Proxy(path, instance, tmp_path)
    proxies.append(proxy)
    proxy.start()
    ask(proxy, "a")
    ask(proxy, "long")
    assert proxy.process is not None

    write_yaml(path, {**raw, "models": {**raw["models"], "a": {**raw["models"]["a"], "port": 70000}}})
    proxy.process.send_signal(signal.SIGHUP)
    poll(lambda: "reload (SIGHUP) refused" in proxy.log(), 15, "the SIGHUP reload")
    assert "models.a.port" in proxy.log()
    answer = httpx.post(f"{proxy.url}/reload", timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "models.a.port"
    ask(proxy, "a")  # the old config serves

    write_yaml(path, {**raw, "models": {"a": raw["models"]["a"]}, "matrix": None})
    proxy.process.send_signal(signal.SIGHUP)
    summary = "reload (SIGHUP): added: -; removed: long; replaced: -; unchanged: 1"
    poll(lambda: summary in proxy.log(), 15, "the SIGHUP reload")
    poll(lambda: running_models(docker_engine, instance) == {"a"}, 15, "the removed model to stop")
    assert model_ids(proxy) == ["a"]
    assert list(proxy.running()) == ["a"]
    assert proxy.alive()
