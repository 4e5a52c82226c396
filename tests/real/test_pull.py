"""Pulls from a real registry on 127.0.0.1 (tests/registry.py): a request for a model whose
image is absent pulls it and is answered; `swapctl pull` shows each layer's progress; a tag
the registry lacks, a registry that wants a login, and `pull_policy: never` with an absent
image each fail with a message naming the model and the image."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from registry import Locked, Registry
from support import Proxy, chat, llama_model, write_yaml

pytestmark = pytest.mark.docker


def write_config(path: Path, instance: str, models_dir: Path, images: dict[str, Any]) -> Path:
    """A model per entry of `images`: name -> image, or (image, pull_policy)."""
    models = {}
    for name, image in images.items():
        image, policy = image if isinstance(image, tuple) else (image, "missing")
        models[name] = {**llama_model(models_dir, 1), "image": image, "pull_policy": policy}
    return write_yaml(path, {"instance": instance, "healthCheckTimeout": 30, "models": models})


def swapctl(config: Path, *argv: str, docker_config: Path | None = None) -> subprocess.CompletedProcess[str]:
    environ = dict(os.environ)
    if docker_config is not None:
        environ["DOCKER_CONFIG"] = str(docker_config)
    return subprocess.run(
        [sys.executable, "-m", "swapctl", *argv, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=environ,
    )


@pytest.fixture
def proxy_for(instance: str, models_dir: Path, tmp_path: Path) -> Iterator[Any]:
    started: list[Proxy] = []

    def start(images: dict[str, Any]) -> Proxy:
        config = write_config(tmp_path / "swapctl.yaml", instance, models_dir, images)
        proxy = Proxy(config, instance, tmp_path)
        started.append(proxy)
        proxy.start()
        return proxy

    yield start
    for proxy in started:
        proxy.close()  # before `instance` removes the containers


def test_a_request_pulls_the_absent_image_and_is_answered(registry: Registry, proxy_for: Any) -> None:
    registry.absent()
    proxy = proxy_for({"pulled": registry.image})
    assert chat(proxy.client(timeout=300), "pulled")
    assert registry.present()
    log = proxy.log()
    assert f"pulling image {registry.image} for pulled" in log
    assert f"pulled image {registry.image} in " in log
    downloaded = log.split(f"pulled image {registry.image} in ")[1].split("\n")[0]
    assert downloaded.endswith(" MB downloaded)"), downloaded  # the layer of its own: 8 MB
    assert log.index("pulled image") < log.index("starting pulled")


def test_swapctl_pull_shows_each_layer_and_exits_0(
    registry: Registry, instance: str, models_dir: Path, tmp_path: Path
) -> None:
    registry.absent()
    config = write_config(
        tmp_path / "swapctl.yaml", instance, models_dir, {"a": registry.image, "b": registry.image}
    )
    done = swapctl(config, "pull")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    out = done.stdout
    assert f"pulling image {registry.image} (a, b)" in out
    assert "Already exists" in out  # the base image's layers are here
    assert "Pull complete" in out and "/8.0 MB" in out  # its own layer, downloaded: 8.0/8.0 MB
    assert f"Status: Downloaded newer image for {registry.image}" in out
    assert f"pulled image {registry.image} in " in out
    assert registry.present()


def test_a_tag_the_registry_lacks_fails_naming_the_image(registry: Registry, proxy_for: Any) -> None:
    missing = registry.image.replace(":pull-test", ":no-such-tag")
    proxy = proxy_for({"ghost": missing, "fine": registry.image})
    done = swapctl(proxy.config, "pull", "ghost")
    assert done.returncode == 1
    expected = f"error: model 'ghost': cannot pull image '{missing}': manifest for {missing} not found"
    assert done.stderr.startswith(expected), done.stderr
    assert "Traceback" not in done.stderr
    with pytest.raises(openai.APIStatusError) as raised:
        chat(proxy.client(), "ghost")
    assert raised.value.status_code == 503
    assert (
        f"model 'ghost': cannot pull image '{missing}': manifest for {missing} not found"
        in raised.value.message
    )
    assert proxy.running()["ghost"]["state"] == "stopped"


def test_never_with_an_absent_image_fails_clearly(registry: Registry, proxy_for: Any) -> None:
    registry.absent()
    proxy = proxy_for({"local": (registry.image, "never")})
    with pytest.raises(openai.APIStatusError) as raised:
        chat(proxy.client(), "local")
    assert raised.value.status_code == 503
    assert f"model 'local': image '{registry.image}' is not on this machine and its pull_policy is never" in (
        raised.value.message
    )
    assert not registry.present()  # nothing was pulled
    assert "pulling image" not in proxy.log()


def test_credentials_come_from_the_docker_config(
    locked_registry: Locked, instance: str, models_dir: Path, tmp_path: Path
) -> None:
    locked = locked_registry.registry
    locked.absent()
    config = write_config(tmp_path / "swapctl.yaml", instance, models_dir, {"private": locked.image})
    nobody = tmp_path / "no-login"
    nobody.mkdir()
    refused = swapctl(config, "pull", docker_config=nobody)
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"error: model 'private': cannot pull image '{locked.image}': "), (
        refused.stderr
    )
    assert "no basic auth credentials" in refused.stderr
    assert "swapctl pulls with your Docker config's credentials" in refused.stderr
    assert not locked.present()
    try:
        done = swapctl(config, "pull", docker_config=locked_registry.docker_config)
        assert done.returncode == 0, done.stderr
        assert locked.present()
    finally:
        locked.absent()  # the same image as the open registry's: gone, so later pulls download it
