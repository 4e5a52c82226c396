"""Helpers shared by the tests: the real `swapctl up` as a subprocess, llama-server model
definitions, Docker read by labels, polling; and the fakes the component tests use (the
stack, an engine with Docker's container IDs, GPUs whose processes are its containers)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Generic, TypeVar

import docker
import httpx
import pytest
import yaml
from openai import OpenAI
from starlette.types import ASGIApp

from swapctl.backend import Backend, Container
from swapctl.backend.fake import FakeBackend
from swapctl.cli import BackendFactory, main
from swapctl.config import Config, parse_config
from swapctl.lifecycle import Swapper
from swapctl.proxy import build_app
from swapctl.proxy.upstream import HttpxUpstream
from swapctl.spec import INSTANCE, MODEL, ContainerSpec


def asgi_scope(path: str = "/v1/chat/completions", method: str = "POST") -> dict[str, Any]:
    """A request's ASGI scope as uvicorn builds it: JSON, from 127.0.0.1 to 127.0.0.1:8080."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},  # as uvicorn says
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8080"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


@contextlib.contextmanager
def json_server(answer: Callable[[BaseHTTPRequestHandler], object]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 (posing as a proxy) whose every GET and POST gets
    `answer(request)` as JSON; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def reply(self) -> None:
            body = json.dumps(answer(self)).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = reply

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def llama_model(models_dir: Path, seed: int, *extra: str, ctx: int = 512) -> dict[str, Any]:
    """A llama-server model serving models_dir/seed-SEED.gguf with context `ctx`, one thread."""
    command = ["--host", "0.0.0.0", "--port", "8080", "-m", f"/models/seed-{seed}.gguf", "-c", str(ctx)]
    return {
        "template": "llama-server",
        "volumes": [f"{models_dir}:/models:ro"],
        "environment": {"LLAMA_ARG_THREADS": "1"},
        "stop_grace_period": "2s",
        "command": [*command, *extra],
    }


def long_model(models_dir: Path, seed: int) -> dict[str, Any]:
    """A model that can generate thousands of tokens in one request.

    The tiny models declare a training context of 2048 tokens, which llama-server caps each
    slot to whatever `-c` says: the override lifts that cap. One slot holds all 16384.
    """
    return llama_model(
        models_dir, seed, "--override-kv", "llama.context_length=int:16384", "-np", "1", ctx=16384
    )


def config_document(
    instance: str, models: dict[str, Any], matrix: dict[str, Any], **top: Any
) -> dict[str, Any]:
    """A config of `instance` for `swapctl up`: `models`, each given 30 s to pass its health
    check, the `matrix`, and the `top` keys."""
    return {"instance": instance, "healthCheckTimeout": 30, **top, "models": models, "matrix": matrix}


def write_yaml(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Proxy:
    """`swapctl up` as a subprocess, with `args` after its own; each start logs to its own file."""

    def __init__(self, config: Path, instance: str, workdir: Path, args: tuple[str, ...] = ()) -> None:
        self.config, self.instance, self.workdir, self.args = config, instance, workdir, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "up-0.log"
        self.starts = 0
        self.clients: list[OpenAI] = []

    def start(self, timeout: float = 30) -> None:
        assert self.process is None, "already running"
        self.starts += 1
        self.log_path = self.workdir / f"up-{self.starts}.log"
        argv = [
            sys.executable,
            "-m",
            "swapctl",
            "up",
            "-c",
            str(self.config),
            "--listen",
            f"127.0.0.1:{self.port}",
            *self.args,
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"swapctl up exited with {self.process.returncode}:\n{self.log()}", pytrace=False)
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"swapctl up did not answer /health in {timeout:g}s:\n{self.log()}", pytrace=False
                )
            time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15) -> int | None:
        """Signal the process (by its PID), kill it after `timeout`; its exit status, None if killed."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(sig)
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
                return None
        return process.returncode

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 60) -> OpenAI:
        client = OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0, timeout=timeout)
        self.clients.append(client)
        return client

    def swapctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "swapctl", *args, "-c", str(self.config), "--url", self.url]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=self.workdir)
        assert done.returncode == 0, f"swapctl {' '.join(args)}: exit {done.returncode}\n{done.stderr}"
        return done

    def swapctl_json(self, *args: str) -> Any:
        return json.loads(self.swapctl(*args, "--json").stdout)

    def running(self) -> dict[str, Any]:
        """model -> its entry in /running (state, container, in_flight, ...)."""
        response = httpx.get(f"{self.url}/running", timeout=10)
        response.raise_for_status()
        return {m["model"]: m for m in response.json()["models"]}

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.stop()


def containers(engine: docker.DockerClient, instance: str, running_only: bool = True) -> dict[str, str]:
    """model -> container ID, as Docker sees it; fails if a model has two containers."""
    filters: dict[str, Any] = {"label": f"{INSTANCE}={instance}"}
    if running_only:
        filters["status"] = "running"
    found = engine.containers.list(all=not running_only, filters=filters)
    models = [c.labels[MODEL] for c in found]
    assert len(models) == len(set(models)), f"a model with two containers: {[c.name for c in found]}"
    return {c.labels[MODEL]: c.id for c in found}


def running_models(engine: docker.DockerClient, instance: str) -> frozenset[str]:
    """The models whose container runs, from one cheap list call (no inspect per container)."""
    found = engine.api.containers(filters={"label": f"{INSTANCE}={instance}", "status": "running"})
    return frozenset(str(c["Labels"][MODEL]) for c in found)


def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}", pytrace=False)
        time.sleep(0.05)


MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story."}]


def ask(proxy: Proxy, model: str) -> None:
    """A short chat completion through the proxy; it must answer."""
    answer = proxy.client().chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
    assert answer.choices[0].message.content is not None


def chat(client: OpenAI, model: str, max_tokens: int = 8) -> str:
    """A chat completion at temperature 0 (deterministic with the tiny models); its text."""
    answer = client.chat.completions.create(
        model=model, messages=MESSAGES, temperature=0, max_tokens=max_tokens
    )
    text = answer.choices[0].message.content
    assert text
    return text


@dataclass
class Streamed:
    """What a raw SSE chat stream delivered, read event by event."""

    status: int
    chunks: int = 0  # chunks with content
    finish_reason: str | None = None
    done: bool = False  # `data: [DONE]` arrived
    error: dict[str, Any] | None = None  # an error event, or the error body of a non-200
    headers: dict[str, str] = field(default_factory=dict)
    ended_at: float = 0.0  # time.monotonic() when the response ended


def take_event(result: Streamed, line: str) -> bool:
    """One line of a chat stream counted into `result`; True if it was an event (`data: {...}`,
    [DONE] aside), after which a reader may decide to leave."""
    if not line.startswith("data: "):
        return False
    data = line.removeprefix("data: ")
    if data == "[DONE]":
        result.done = True
        return False
    event = json.loads(data)
    if "error" in event:
        result.error = event["error"]
    for choice in event.get("choices", []):
        if choice.get("delta", {}).get("content"):
            result.chunks += 1
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    return True


def stream_chat(
    url: str,
    model: str,
    max_tokens: int,
    on_event: Callable[[Streamed], bool] | None = None,
    timeout: float = 60,
) -> Streamed:
    """Stream a chat completion through the proxy with httpx, parsing each SSE event.

    `on_event` is called after each event; returning False closes the connection at once
    (a client going away mid-stream).
    """
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "stream": True, "temperature": 0}
    with (
        httpx.Client(timeout=timeout) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
    ):
        result = Streamed(status=response.status_code, headers=dict(response.headers))
        if response.status_code != 200:
            response.read()
            result.error = response.json().get("error")
            result.ended_at = time.monotonic()
            return result
        for line in response.iter_lines():
            if take_event(result, line) and on_event is not None and not on_event(result):
                break
        result.ended_at = time.monotonic()
        return result


class FakeStack:
    """The swapper and the proxy app over a fake engine, and an HTTP client of the app (in
    process): what the component tests of the proxy share. `app_options` go to build_app."""

    def __init__(
        self, config: dict[str, Any], backend: FakeBackend | None = None, **app_options: Any
    ) -> None:
        self.backend = backend or FakeBackend()
        self.upstream = httpx.AsyncClient(transport=self.backend.transport)
        self.swapper = Swapper(parse_config(config), self.backend, self.upstream)
        self.app: ASGIApp = build_app(
            self.swapper.config,
            self.swapper,
            HttpxUpstream(self.upstream),
            self.swapper.metrics,
            **app_options,
        )
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://127.0.0.1"
        )

    async def use(self, model: str) -> None:
        """Start `model` as a request would, and end that request."""
        await (await self.swapper.acquire(model)).release()

    async def close(self) -> None:
        await self.swapper.unload()
        await self.client.aclose()
        await self.upstream.aclose()


class HexIds(FakeBackend):
    """The fake engine with 64-hex container IDs, as Docker writes them into cgroup paths."""

    def start(self, spec: ContainerSpec) -> Container:
        container = super().start(spec)
        box = self.boxes.pop(container.id)
        box.container = replace(container, id=hashlib.sha256(container.id.encode()).hexdigest())
        self.boxes[box.container.id] = box
        return box.container


OUTSIDE = 7  # the PID of a process in no container, on a fake GPU


@dataclass
class ModelProcess:
    """A process on a fake GPU, holding a model's memory."""

    model: str
    pid: int


Process = TypeVar("Process", bound=ModelProcess)


class ContainerGpus(Generic[Process]):
    """Fake GPUs whose processes are those of the engine's running containers (instance
    `test`) of the models that have a `vram`; subclasses say which hold what, in `read`."""

    def __init__(self, backend: FakeBackend, vram: Mapping[str, int]) -> None:
        self.backend, self.vram = backend, vram
        self.holders: dict[str, Process] = {}  # container ID -> its process
        self.pids = itertools.count(100)
        self.lock = threading.Lock()

    def running(self) -> dict[str, str]:
        """Container ID -> model, for each running container whose model has a `vram`."""
        return {c.id: c.model for c in self.backend.list("test") if c.running and c.model in self.vram}

    def cgroup(self, pid: int) -> str | None:
        """A running container's process names it; a stopped one's is gone from /proc."""
        with self.lock:
            running = {c.id for c in self.backend.list("test") if c.running}
            for cid, holder in self.holders.items():
                if holder.pid == pid and cid in running:
                    return f"0::/system.slice/docker-{cid}.scope\n"
        return "0::/user.slice\n" if pid == OUTSIDE else None


class Clock:
    """A manual clock: time moves only when a test moves it, or when the code under test
    sleeps, and not while `frozen`."""

    def __init__(self, frozen: bool = False) -> None:
        self.now = 1000.0
        self.frozen = frozen

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += 0 if self.frozen else seconds
        await asyncio.sleep(0)


class Swappers:
    """Builds Swappers over fake engines, each with an httpx client on the engine's transport;
    `aclose` closes those clients. A Swapper given no clock runs on a fresh manual Clock when
    `clocked`, on the real time otherwise. `options` go to Swapper."""

    def __init__(self, clocked: bool = False) -> None:
        self.clocked = clocked
        self.clients: list[httpx.AsyncClient] = []

    def __call__(
        self, config: Config, backend: FakeBackend, clock: Clock | None = None, **options: Any
    ) -> Swapper:
        client = httpx.AsyncClient(transport=backend.transport)
        self.clients.append(client)
        if clock is None and self.clocked:
            clock = Clock()
        if clock is not None:
            options.update(clock=clock, sleep=clock.sleep)
        return Swapper(config, backend, client, **options)

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()


def swappers_fixture(clocked: bool = False) -> Callable[[], AsyncIterator[Swappers]]:
    """A fixture (bind it to a name in a test module: `swapper_for = swappers_fixture()`)
    giving a test its Swappers(clocked), whose clients close after the test."""

    @pytest.fixture
    async def swappers() -> AsyncIterator[Swappers]:
        built = Swappers(clocked)
        yield built
        await built.aclose()

    return swappers


def config_file(folder: Path, config: str | dict[str, Any], name: str = "swapctl.yaml") -> Path:
    """`config` (YAML text, or a document to dump as YAML) written to folder/name; its path."""
    path = folder / name
    if isinstance(config, str):
        path.write_text(config, encoding="utf-8")
        return path
    return write_yaml(path, config)


def run_cli(
    capsys: pytest.CaptureFixture[str], backend_factory: BackendFactory, *argv: str
) -> tuple[int, str, str]:
    """`swapctl ARGV` in process over the engine `backend_factory` builds: its exit code,
    stdout and stderr."""
    try:
        main(list(argv), backend_factory=backend_factory)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def no_engine() -> Backend:
    raise AssertionError("--running was given: the engine is not asked")


def run_without_engine(capsys: pytest.CaptureFixture[str], path: Path, *argv: str) -> tuple[int, str, str]:
    """`swapctl ARGV -c PATH` in process, failing if the command asks for the engine."""
    return run_cli(capsys, no_engine, *argv, "-c", str(path))
