"""What a real `swapctl up` tells and keeps: /logs, /metrics, adoption across restarts."""

from __future__ import annotations

import signal
from pathlib import Path

import docker
import httpx
import pytest
from support import Proxy, containers, llama_model, write_yaml

pytestmark = pytest.mark.docker


def test_logs_and_metrics_tell_what_happened(instance: str, models_dir: Path, tmp_path: Path) -> None:
    config = {
        "instance": instance,
        "models": {"a": llama_model(models_dir, 1), "b": llama_model(models_dir, 2)},
    }
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)
    proxy.start()
    try:
        client = proxy.client()
        for model in ("a", "b"):  # one at a time: b evicts a
            client.chat.completions.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        logs = httpx.get(f"{proxy.url}/logs", timeout=10).text
        assert "swap: a ready" in logs
        assert "swap: b ready" in logs
        assert "evicted a" in logs
        assert "llama_server: initializing" in httpx.get(f"{proxy.url}/logs/b", timeout=10).text
        metrics = httpx.get(f"{proxy.url}/metrics", timeout=10).text
        assert 'swapctl_requests_total{code="200",model="a"} 1.0' in metrics
        assert 'swapctl_model_evictions_total{model="a"} 1.0' in metrics
        assert 'swapctl_model_state{model="b",state="ready"} 1.0' in metrics
    finally:
        proxy.close()


def test_a_restart_replaces_only_the_model_whose_image_was_rebuilt(
    instance: str, models_dir: Path, tmp_path: Path, docker_engine: docker.DockerClient
) -> None:
    image = f"swapctl-test/{instance}:latest"

    def build(label: str) -> None:
        (tmp_path / "Dockerfile").write_text(f"FROM swapctl/llama-server:sid\nLABEL build={label}\n")
        docker_engine.images.build(path=str(tmp_path), tag=image, rm=True)

    build("one")
    rebuilt = {**llama_model(models_dir, 2), "image": image}
    config = {"instance": instance, "models": {"a": llama_model(models_dir, 1), "b": rebuilt}}
    config["matrix"] = {"sets": {"both": "a & b"}}
    proxy = Proxy(write_yaml(tmp_path / "swapctl.yaml", config), instance, tmp_path)
    try:
        proxy.start()
        for model in ("a", "b"):
            proxy.client().chat.completions.create(
                model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
            )
        before = containers(docker_engine, instance)
        proxy.stop(signal.SIGINT)
        build("two")
        proxy.start()
        log = proxy.log()
        assert "adopted a (" in log
        assert "its spec or image changed" in log
        after = containers(docker_engine, instance)
        assert after == {"a": before["a"]}  # a kept, b removed until asked for again
    finally:
        proxy.close()
        docker_engine.images.remove(image, force=True)
