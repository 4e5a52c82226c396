"""An in-memory container engine for fast tests, shipped in the package like httpx's
MockTransport. Its containers answer HTTP through `transport`, an httpx transport that
routes by port, so the swapper and the proxy run unchanged against it."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace

import httpx

from swapctl.backend.base import Container
from swapctl.backend.lines import split_lines
from swapctl.backend.progress import LayerReport, PullListener
from swapctl.errors import BackendError, GpuUnavailable, ImageMissing, PullFailed
from swapctl.spec import ContainerSpec, placed_ids

Handler = Callable[[httpx.Request, "FakeContainer"], Awaitable[httpx.Response]]


@dataclass
class FakeContainer:
    container: Container
    spec: ContainerSpec
    created: float
    ready_after: float = 0.0
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    log: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.clock() >= self.created + self.ready_after


async def _sse(model: str) -> AsyncIterator[bytes]:
    for word in ("hello", " from", f" {model}"):
        chunk = {"object": "chat.completion.chunk", "model": model, "choices": [{"delta": {"content": word}}]}
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield b"data: [DONE]\n\n"


async def echo(request: httpx.Request, box: FakeContainer) -> httpx.Response:
    """A tiny OpenAI-like server: health, and completions that name the model they got."""
    if request.url.path == "/health":
        return httpx.Response(200 if box.ready else 503, json={"status": "ok" if box.ready else "loading"})
    raw = await request.aread()
    if not request.headers.get("content-type", "").startswith("application/json"):
        seen = {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query.decode(),
            "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "served_by": box.spec.model,
        }
        return httpx.Response(200, json=seen)
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        body = None
    if not isinstance(body, dict):  # as a real server would answer a body it cannot read
        return httpx.Response(400, json={"error": {"message": "the body is not a JSON object"}})
    model = body.get("model", "")
    if body.get("stream"):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(model))
    message = {"role": "assistant", "content": f"hello from {model} in {box.spec.model}"}
    return httpx.Response(
        200, json={"object": "chat.completion", "model": model, "choices": [{"message": message}]}
    )


@dataclass
class FakeModel:
    """How the fake container of one model behaves."""

    ready_after: float = 0.0
    exit_at_start: str | None = None  # a log line; the container exits at once
    handler: Handler = echo
    unstoppable: bool = False  # stop (and kill) fail, as with a wedged driver or a broken engine


@dataclass
class FakeImage:
    """An image the fake registry holds, and how a pull of it goes."""

    layers: tuple[int, ...] = (1_000_000,)  # the bytes of each layer
    refusal: str | None = None  # the registry's answer: a pull fails with it
    hold: threading.Event | None = None  # a pull waits for it, halfway through its first layer


class FakeBackend:
    def __init__(
        self, images: set[str] | None = None, gpus: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock  # when containers become ready: a test's manual clock, or real time
        self.images = images  # None: every image exists
        self.gpus = gpus
        self.behaviour: dict[str, FakeModel] = {}
        self.boxes: dict[str, FakeContainer] = {}
        self.starts: dict[str, int] = {}
        self.started: list[str] = []  # models, in the order their containers started
        self.builds: dict[str, int] = {}  # image name -> times rebuilt
        self.registry: dict[str, FakeImage] = {}  # what a pull can get; others are unknown to it
        self.pulls: list[str] = []  # images, in the order their pulls began
        self._ids = itertools.count(1)
        self.transport = _Transport(self)
        self.logged = threading.Condition()  # notified when a container logs a line or stops
        self.reachable = True  # what ping answers: False plays an engine that stopped answering

    def list(self, instance: str) -> list[Container]:
        # the swapper calls from threads: iterate over a copy (list() of a dict is atomic)
        return [b.container for b in list(self.boxes.values()) if b.spec.instance == instance]

    def start(self, spec: ContainerSpec) -> Container:
        if self.images is not None and spec.image not in self.images:
            raise ImageMissing(f"image '{spec.image}' is not on this machine", spec.model)
        if (spec.gpus is not None or spec.device_requests) and not self.gpus:
            raise GpuUnavailable("it asks for GPUs but there is no GPU runtime", spec.model)
        for box in [b for b in list(self.boxes.values()) if b.container.name == spec.name]:
            self.boxes.pop(box.container.id, None)  # a leftover of ours with the same name
        behaviour = self.behaviour.get(spec.model, FakeModel())
        number = next(self._ids)
        exited = behaviour.exit_at_start is not None
        # as with Docker, a container that is not running publishes no port
        container = Container(
            f"fake{number}",
            spec.name,
            spec.model,
            "exited" if exited else "running",
            None if exited else 40000 + number,
            spec.spec_hash,
            time.time(),
            self.image_id(spec.image) or "",
            placed_ids(spec.labels),
        )
        box = FakeContainer(container, spec, self.clock(), behaviour.ready_after, clock=self.clock)
        if behaviour.exit_at_start is not None:
            box.log.append(behaviour.exit_at_start)
        self.boxes[container.id] = box
        self.starts[spec.model] = self.starts.get(spec.model, 0) + 1
        self.started.append(spec.model)
        return container

    def image_id(self, image: str) -> str | None:
        if self.images is not None and image not in self.images:
            return None
        return f"sha256:{image}:{self.builds.get(image, 0)}"

    def pull(self, image: str, on_progress: PullListener) -> None:
        """Report each layer as Docker does, then hold the image; one the registry lacks or
        refuses fails as a real pull does, naming the image and quoting the registry."""
        self.pulls.append(image)
        found = self.registry.get(image)
        if found is None or found.refusal is not None:
            answer = found.refusal if found else f"manifest for {image} not found: manifest unknown"
            raise PullFailed(f"cannot pull image '{image}': {answer}")
        layers = [(f"layer{number}", size) for number, size in enumerate(found.layers)]
        on_progress(LayerReport("", f"Pulling {image}"))
        for layer, _ in layers:
            on_progress(LayerReport(layer, "Pulling fs layer"))
        for number, (layer, size) in enumerate(layers):
            on_progress(LayerReport(layer, "Downloading", size // 2, size))
            if number == 0 and found.hold is not None:
                found.hold.wait(30)
            on_progress(LayerReport(layer, "Downloading", size, size))
            on_progress(LayerReport(layer, "Download complete"))
            on_progress(LayerReport(layer, "Pull complete"))
        if self.images is not None:
            self.images.add(image)

    def rebuild(self, image: str) -> None:
        """The image is built again under the same name: it gets a new ID."""
        self.builds[image] = self.builds.get(image, 0) + 1

    def get(self, container_id: str) -> Container | None:
        box = self.boxes.get(container_id)
        return box.container if box else None

    def stop(self, container_id: str, grace: float) -> None:
        box = self.boxes.get(container_id)
        if box is not None and self.behaviour.get(box.spec.model, FakeModel()).unstoppable:
            raise BackendError(f"cannot stop {box.container.name}: the engine refused", box.spec.model)
        with self.logged:
            self.boxes.pop(container_id, None)
            self.logged.notify_all()

    def ping(self) -> bool:
        return self.reachable

    def logs(self, container_id: str, tail: int = 50) -> str:
        box = self.boxes.get(container_id)
        return "\n".join(box.log[-tail:]) if box else ""

    def follow(self, container_id: str) -> _Follow:
        return _Follow(self, container_id)

    def write_log(self, model: str, line: str) -> None:
        """The model's running container writes a line to its log."""
        with self.logged:
            for box in list(self.boxes.values()):
                if box.container.model == model and box.container.running:
                    box.log.append(line)
            self.logged.notify_all()

    def crash(self, model: str) -> None:
        """The model's container dies, as a crash or an out-of-memory kill would do."""
        with self.logged:
            for box in list(self.boxes.values()):
                if box.container.model == model:
                    box.container = replace(box.container, state="exited", host_port=None)
            self.logged.notify_all()

    def running_models(self) -> set[str]:
        return {b.container.model for b in list(self.boxes.values()) if b.container.running}


class _Follow:
    """A fake container's log, followed: every line it has, then each new one, until it
    stops or `close` is called (from any thread). Its lines pass through the same cut as
    Docker's bytes, so an over-long one comes cut short."""

    def __init__(self, backend: FakeBackend, container_id: str) -> None:
        self.backend, self.container_id = backend, container_id
        self.closed = False

    def __iter__(self) -> Iterator[str]:
        return split_lines(f"{line}\n".encode() for line in self._lines())

    def _lines(self) -> Iterator[str]:
        sent = 0
        while (line := self._line(sent)) is not None:
            sent += 1
            yield line

    def _line(self, number: int) -> str | None:
        """Line `number` of the log, once written; None at the end."""
        with self.backend.logged:
            while True:
                box = self.backend.boxes.get(self.container_id)
                if self.closed or box is None:
                    return None
                if number < len(box.log):
                    return box.log[number]
                if not box.container.running:
                    return None
                self.backend.logged.wait()

    def close(self) -> None:
        with self.backend.logged:
            self.closed = True
            self.backend.logged.notify_all()


class _Transport(httpx.AsyncBaseTransport):
    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        port = request.url.port
        box = next((b for b in list(self.backend.boxes.values()) if b.container.host_port == port), None)
        if box is None or not box.container.running:
            raise httpx.ConnectError("connection refused", request=request)
        behaviour = self.backend.behaviour.get(box.spec.model, FakeModel())
        response = await behaviour.handler(request, box)
        if response.is_stream_consumed:  # built from bytes: serve them as a stream, as a socket would
            return httpx.Response(
                response.status_code, headers=response.headers, stream=_Body(response.content)
            )
        return response


class _Body(httpx.AsyncByteStream):
    def __init__(self, content: bytes) -> None:
        self.content = content

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.content
