"""A real container registry for the pull tests (the `registry` and `locked_registry`
fixtures of conftest.py): Debian's `docker-registry` (the distribution project's server),
started once per session on 127.0.0.1 with filesystem storage in a temporary folder, and
stopped by its PID at the end.

The image it serves is the test image plus one layer of random bytes, built here and pushed
as `127.0.0.1:PORT/swapctl/llama-server:pull-test`; then that tag, and only that tag, is
removed locally. The base image stays, so a pull downloads the new layer (with progress) and
finds the others present, as a pull of a new version of an image does. A second registry on
the same storage asks for a login, for the credentials test. A registry that cannot be
started FAILS the tests that need it.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
import subprocess
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import httpx
import pytest
from netns import Namespace, stop_pid
from support import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "registry.sh"
BASE_IMAGE = "swapctl/llama-server:sid"
REPOSITORY = "swapctl/llama-server"
LAYER_BYTES = 8_000_000  # random, so it does not compress: the pull downloads about this much


@dataclass(frozen=True)
class Registry:
    host: str  # 127.0.0.1:PORT
    engine: docker.DockerClient
    storage: Path  # its folder: configuration, logs, and the images under data/

    @property
    def image(self) -> str:
        """The image it serves: the test image plus a layer of its own."""
        return f"{self.host}/{REPOSITORY}:pull-test"

    def absent(self) -> None:
        """Remove this registry's tag of the image here (only that tag: never the base image),
        so that the next start or `swapctl pull` pulls it."""
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.engine.api.remove_image(self.image, force=True)

    def present(self) -> bool:
        try:
            self.engine.api.inspect_image(self.image)
        except docker.errors.ImageNotFound:
            return False
        return True


def _install() -> None:
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.fail(
            f"scripts/registry.sh failed (exit {done.returncode}):\n{done.stdout}{done.stderr}", pytrace=False
        )


@contextlib.contextmanager
def _serving(folder: Path, storage: Path, auth: Path | None = None) -> Iterator[str]:
    """`docker-registry serve` on 127.0.0.1 and a free port, storing in `storage`, with an
    htpasswd file if given; yields HOST:PORT once it answers, stops it by its PID after."""
    port = free_port()
    lines = ["version: 0.1", "log: {level: warn}", f"storage: {{filesystem: {{rootdirectory: {storage}}}}}"]
    lines.append(f"http: {{addr: '127.0.0.1:{port}', secret: {secrets.token_hex(16)}}}")
    if auth is not None:
        lines.append(f"auth: {{htpasswd: {{realm: swapctl-test, path: {auth}}}}}")
    config = folder / f"registry-{port}.yml"
    config.write_text("\n".join(lines) + "\n")
    log_path = folder / f"registry-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["/usr/bin/docker-registry", "serve", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _until_it_answers(process, port, log_path)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _until_it_answers(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            pytest.fail(
                f"docker-registry exited with {process.returncode} at start:\n{log_path.read_text()}",
                pytrace=False,
            )
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code in (200, 401):
                return
        if time.monotonic() > deadline:
            pytest.fail(
                f"docker-registry did not answer on 127.0.0.1:{port}:\n{log_path.read_text()}", pytrace=False
            )
        time.sleep(0.05)


def _build_and_push(engine: docker.DockerClient, image: str) -> None:
    """The test image plus a layer of random bytes, tagged `image`, pushed, and its tag removed."""
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for name, data in (
            ("Dockerfile", f"FROM {BASE_IMAGE}\nCOPY blob /pull-test.blob\n".encode()),
            ("blob", os.urandom(LAYER_BYTES)),
        ):
            entry = tarfile.TarInfo(name)
            entry.size = len(data)
            tar.addfile(entry, io.BytesIO(data))
    context.seek(0)
    try:
        built = list(engine.api.build(fileobj=context, custom_context=True, tag=image, rm=True, decode=True))
        errors = [line for line in built if "error" in line]
        assert not errors, f"building {image}: {errors}"
        repository, tag = image.rsplit(":", 1)
        pushed = list(engine.api.push(repository, tag=tag, stream=True, decode=True))
        errors = [line for line in pushed if "error" in line]
        assert not errors, f"pushing {image}: {errors}"
    except (docker.errors.DockerException, AssertionError) as error:
        pytest.fail(f"the pull tests' image could not be pushed to the registry: {error}", pytrace=False)
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.api.remove_image(image, force=True)


@contextlib.contextmanager
def serve_registry(engine: docker.DockerClient, storage: Path) -> Iterator[Registry]:
    """A registry on 127.0.0.1 that serves `Registry.image`, absent here at the start."""
    _install()
    with _serving(storage, storage / "data") as host:
        found = Registry(host, engine, storage)
        _build_and_push(engine, found.image)
        try:
            yield found
        finally:
            found.absent()


@contextlib.contextmanager
def serve_in(box: Namespace, registry: Registry, engine: docker.DockerClient) -> Iterator[Registry]:
    """`registry`'s storage served inside `box` on the box's own 127.0.0.1 (a port of its
    own), for `engine`, the box's Docker engine, to pull from (over plain HTTP, as Docker does
    for 127.0.0.0/8); stopped by its PID at the end."""
    port = free_port()
    config = registry.storage / f"registry-box-{port}.yml"
    config.write_text(
        f"version: 0.1\nlog: {{level: warn}}\nstorage: {{filesystem: {{rootdirectory: {registry.storage / 'data'}}}}}\n"
        f"http: {{addr: '127.0.0.1:{port}', secret: {secrets.token_hex(16)}}}\n"
    )
    log_path = registry.storage / f"registry-box-{port}.log"
    pid = box.spawn(["/usr/bin/docker-registry", "serve", str(config)], log_path)
    try:
        deadline = time.monotonic() + 15
        probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/v2/', timeout=1)"
        while box.execute("python3", "-c", probe, check=False).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"docker-registry did not answer in the box:\n{log_path.read_text()}", pytrace=False
                )
            time.sleep(0.1)
        found = Registry(f"127.0.0.1:{port}", engine, registry.storage)
        yield found
        found.absent()
    finally:
        stop_pid(pid)


@dataclass(frozen=True)
class Locked:
    """The same image through a registry that asks for a login, and a Docker config folder
    (for DOCKER_CONFIG) that has it."""

    registry: Registry
    docker_config: Path


@contextlib.contextmanager
def serve_locked(registry: Registry) -> Iterator[Locked]:
    """A second registry on `registry`'s storage that answers only with a login (htpasswd)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt  # bcrypt, which the registry's htpasswd wants, from the C library

    password = secrets.token_hex(8)
    htpasswd = registry.storage / "htpasswd"
    salt = crypt.mksalt(crypt.METHOD_BLOWFISH)  # noqa: S324 - bcrypt, not a weak hash
    htpasswd.write_text(f"tester:{crypt.crypt(password, salt)}\n")
    with _serving(registry.storage, registry.storage / "data", auth=htpasswd) as host:
        folder = registry.storage / f"docker-config-{host.rpartition(':')[2]}"
        folder.mkdir()
        login = base64.b64encode(f"tester:{password}".encode()).decode()
        (folder / "config.json").write_text(json.dumps({"auths": {host: {"auth": login}}}))
        found = Locked(Registry(host, registry.engine, registry.storage), folder)
        try:
            yield found
        finally:
            found.registry.absent()
