"""The Docker engine through the Docker SDK: the only module that imports `docker`.

Every SDK error is translated once, in `_translate`, into swapctl's error tree; an engine
that cannot be reached is named with why (refused, no answer in time, TLS, ssh).
`create_arguments` (pure) turns a ContainerSpec into the SDK's `containers.create` keywords
(https://docker-py.readthedocs.io/en/stable/containers.html), the form Compose's keys take
in Docker's API (https://docs.docker.com/reference/api/engine/version/v1.41/#tag/Container/operation/ContainerCreate).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import requests.exceptions

from swapctl.backend.base import Container
from swapctl.backend.lines import split_lines
from swapctl.backend.progress import LayerReport, PullListener
from swapctl.config.hosts import LOCAL, Engine
from swapctl.errors import BackendError, DaemonUnavailable, GpuUnavailable, ImageMissing, PullFailed
from swapctl.spec import (
    INSTANCE,
    MANAGED,
    MODEL,
    NETWORK,
    PORT,
    SPEC_HASH,
    ContainerSpec,
    device_requests,
    joined_networks,
    placed_ids,
)


@contextlib.contextmanager
def _hidden(name: str) -> Iterator[None]:
    """`import name` fails inside the block, unless the module is loaded already."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = None  # type: ignore[assignment]  # Python's mark of a module not to import
    try:
        yield
    finally:
        del sys.modules[name]


# The SDK loads paramiko (and invoke with it: most of the SDK's import time) for ssh://
# engines, used or not, and goes on without it where it is missing. Hidden while the SDK
# loads, it loads when an engine's URL is ssh:// (`_ssh_transport`), and only then.
with _hidden("paramiko"):
    import docker
    import docker.api.client
    import docker.context
    import docker.errors
    import docker.tls
    import docker.transport

if TYPE_CHECKING:
    from swapctl.config import Network

T = TypeVar("T")
NAME_WAIT = 10.0  # seconds a start waits for a leftover's name to be freed
MIN_API = "1.24"  # the oldest API version engines still answer: enough to ask for theirs


class Gone(BackendError):
    """The container asked about does not exist (any more): callers take it as an answer."""


@functools.cache
def _ssh_transport() -> None:
    """Load the SDK's ssh:// transport, and paramiko with it (the SDK's import went without),
    its connect bounded by the engine's timeout."""
    from docker.transport.sshconn import SSHHTTPAdapter

    class BoundedSSHAdapter(SSHHTTPAdapter):  # type: ignore[misc]
        """The SDK's adapter, whose connect (TCP, then ssh's banner and authentication) and
        each session it opens (one per pooled connection) wait no longer than the engine's
        timeout: the SDK passes none, so a connect waits as long as the kernel does (two
        minutes where packets are dropped) and a session an hour (paramiko's default)."""

        def __init__(self, base_url: str, timeout: float = 60, **options: Any) -> None:
            self.bound = timeout  # the SDK connects before it keeps its timeout
            super().__init__(base_url, timeout, **options)

        def _connect(self) -> None:
            if self.ssh_client:
                bound = {"timeout": self.bound, "banner_timeout": self.bound, "auth_timeout": self.bound}
                self.ssh_client.connect(**{**self.ssh_params, **bound})
                self.ssh_client.get_transport().channel_timeout = self.bound

    for module in (docker.transport, docker.api.client):  # where the SDK looks it up
        module.SSHHTTPAdapter = BoundedSSHAdapter


def _ssh_errors() -> tuple[type[Exception], ...]:
    """paramiko's errors, once an ssh:// engine has loaded it (nothing else raises them)."""
    paramiko = sys.modules.get("paramiko")
    return (paramiko.SSHException,) if paramiko is not None else ()


def _socket_errors() -> tuple[type[Exception], ...]:
    """What a connection raises below the SDK: its socket's errors, and paramiko's over ssh://."""
    return (OSError, *_ssh_errors())


def _ssh_error(error: BaseException, kind: str) -> bool:
    """Whether `error` is paramiko's `kind` of error (never, while paramiko is not loaded)."""
    paramiko = sys.modules.get("paramiko")
    return paramiko is not None and isinstance(error, getattr(paramiko, kind))


def _translate(
    error: Exception, model: str | None = None, image: str | None = None, engine: Engine = LOCAL
) -> BackendError:
    if isinstance(error, docker.errors.ImageNotFound):
        return ImageMissing(
            f"image '{image}' is not on this machine: build it (for the bundled images: make images) "
            "or pull it (docker pull)",
            model,
        )
    if isinstance(error, docker.errors.NotFound) and "network" in str(error.explanation):
        return BackendError(
            f"Docker refused: {error.explanation}: create it (docker network create NAME) or remove it "
            "from `networks`/`network_mode`",
            model,
        )
    if isinstance(error, docker.errors.NotFound):
        return Gone(str(error.explanation or error), model)
    if isinstance(error, docker.errors.APIError):
        text = str(error.explanation or error)
        if "could not select device driver" in text:
            return GpuUnavailable(
                "it asks for GPUs (gpus:) but Docker has no GPU runtime: install the NVIDIA Container "
                f"Toolkit, or remove gpus: (or deploy.resources.reservations.devices) from this model ({text})",
                model,
            )
        return BackendError(f"Docker refused: {text}", model)
    unreachable: tuple[type[Exception], ...] = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        *_ssh_errors(),
    )
    if isinstance(error, (*unreachable, docker.errors.DockerException, OSError)):
        return _unreachable(error, engine, model)
    return BackendError(f"{type(error).__name__}: {error}", model)


def _unreachable(error: BaseException, engine: Engine, model: str | None) -> DaemonUnavailable:
    if engine.docker is None:  # the local engine, as the environment names it
        return DaemonUnavailable(
            f"cannot reach the Docker daemon ({error}); is it running? (`make docker` starts one here)", model
        )
    return DaemonUnavailable(
        f"cannot reach the Docker engine of {engine.where}: {_why(error, engine)}", model
    )


def _why(error: BaseException, engine: Engine) -> str:
    """Why an engine did not answer, in a person's words, the SDK's own after them."""
    causes = [error]
    while (cause := causes[-1].__cause__ or causes[-1].__context__) is not None and len(causes) < 10:
        causes.append(cause)  # the SDK wraps what failed (fetching the API version, say)
    text = " ".join(str(c) for c in causes)
    if any(_ssh_error(c, "AuthenticationException") for c in causes):
        why = "ssh authentication failed: is this user's key (~/.ssh/config IdentityFile) authorised there?"
    elif "not found in known_hosts" in text:
        why = "ssh refused its host key, unknown here: ssh to it once to add it to ~/.ssh/known_hosts"
    elif any(_ssh_error(c, "ChannelException") for c in causes):
        why = (
            "ssh would not open another session (sshd's MaxSessions, 10 by default, bounds the calls at once)"
        )
    elif any(isinstance(c, (requests.exceptions.Timeout, TimeoutError)) for c in causes) or any(
        words in text
        for words in ("timed out", "Timeout opening channel")  # the socket's; ssh's session
    ):
        why = f"no answer within {engine.timeout:g}s: is the machine up and reachable?"
    elif any(_ssh_error(c, "SSHException") for c in causes):
        why = "ssh failed"
    elif any(isinstance(c, (ssl.SSLError, requests.exceptions.SSLError)) for c in causes) or "SSL" in text:
        why = "TLS failed: check tls.ca, tls.cert and tls.key against the engine's --tlscacert, --tlscert, --tlskey"
        if engine.tls is not None and engine.tls.cert is None:
            why = "TLS failed: the engine wants a client certificate its CA signed (tls.cert and tls.key)"
    elif "refused" in text.lower():
        why = "connection refused: is dockerd running and listening there?"
    elif "reset by peer" in text.lower():
        why = "connection reset: the engine dropped it (did dockerd stop or restart?)"
    else:
        why = "no answer"
    return f"{why} ({causes[-1]})"


def pull_report(line: dict[str, Any]) -> LayerReport:
    """One line of the engine's pull stream (`{"id", "status", "progressDetail"}`) as a report."""
    detail = line.get("progressDetail") or {}
    current, total = (
        value if isinstance(value := detail.get(key), int) else None for key in ("current", "total")
    )
    return LayerReport(str(line.get("id") or ""), str(line.get("status") or ""), current, total)


def pull_failure(image: str, answer: str) -> PullFailed:
    """A failed pull, naming the image and quoting the answer, with a hint when it asks for a login."""
    asks = ("no basic auth credentials", "unauthorized", "authentication required")
    hint = ""
    if any(word in answer.lower() for word in asks) and "docker login" not in answer:
        hint = " (log in with docker login REGISTRY: swapctl pulls with your Docker config's credentials)"
    return PullFailed(f"cannot pull image '{image}': {answer}{hint}")


def create_arguments(spec: ContainerSpec, address: str = LOCAL.address) -> dict[str, Any]:
    """The keywords of `containers.create` for `spec`, unset ones left out, its port published
    on the engine's `address`, or none when it joins swapctl's `network` (reached there). The
    container joins its first network (`joined_networks`) at creation; `start` connects it
    to the others."""
    arguments: dict[str, Any] = {
        "image": spec.image,
        "name": spec.name,
        "command": list(spec.command) if spec.command is not None else None,
        "entrypoint": list(spec.entrypoint) if spec.entrypoint is not None else None,
        "environment": dict(spec.environment),
        "volumes": list(spec.volumes),
        "labels": dict(spec.labels),
        # swapctl's way in, whatever its networks, unless it reaches the container on its own
        "ports": {f"{spec.port}/tcp": (address, None)} if spec.network is None else None,
        "init": True,
        "detach": True,
        "stop_signal": spec.stop_signal,
        "shm_size": spec.shm_size,
        "working_dir": spec.working_dir,
        "user": spec.user,
        "ipc_mode": spec.ipc,
        "devices": list(spec.devices) or None,
        "device_requests": [docker.types.DeviceRequest(**r) for r in device_requests(spec)] or None,
        "ulimits": [docker.types.Ulimit(name=u.name, soft=u.soft, hard=u.hard) for u in spec.ulimits] or None,
        "runtime": spec.runtime,
        "group_add": list(spec.group_add) or None,
        "security_opt": list(spec.security_opt) or None,
        "cap_add": list(spec.cap_add) or None,
        "cap_drop": list(spec.cap_drop) or None,
        "tmpfs": dict(entry.partition(":")[::2] for entry in spec.tmpfs) or None,
        "mem_limit": spec.mem_limit,
        "nano_cpus": round(spec.cpus * 1e9) if spec.cpus is not None else None,
        "extra_hosts": list(spec.extra_hosts) or None,
        "network_mode": spec.network_mode,
        **_first_network(joined_networks(spec)[:1]),
    }
    return {key: value for key, value in arguments.items() if value is not None}


def _first_network(networks: tuple[Network, ...]) -> dict[str, Any]:
    if not networks:
        return {}
    [network] = networks
    endpoint = {"Aliases": list(network.aliases)} if network.aliases else None
    return {"network": network.name, "networking_config": {network.name: endpoint} if endpoint else None}


_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)")


def _epoch(text: str | None) -> float | None:
    """Docker's RFC 3339 time (nanoseconds, trailing zeros of the fraction dropped, or none) in
    epoch seconds; None for the zero time or anything else."""
    found = _RFC3339.fullmatch(text or "")
    if found is None or found[1].startswith("0001-"):
        return None
    seconds, fraction, zone = found.groups()
    moment = datetime.fromisoformat(seconds + ("+00:00" if zone == "Z" else zone))
    return moment.timestamp() + float(f"0.{fraction or 0}")


def _reached(
    labels: Mapping[str, str], networks: Mapping[str, Any] | None, published: int | None, address: str
) -> tuple[int | None, str]:
    """Where swapctl reaches a container (port, address): at its address on swapctl's network
    and its server's port, when it joined one (labels say which); else the port it publishes
    on the engine's address. No port while it has no address there (not running)."""
    name = labels.get(NETWORK)
    if name is None:
        return published, address
    endpoint = (networks or {}).get(name) or {}
    found = endpoint.get("IPAddress") or endpoint.get("GlobalIPv6Address")
    port = labels.get(PORT, "")
    return (int(port), str(found)) if found and port.isdigit() else (None, address)


def _from_inspect(attrs: dict[str, Any], address: str = LOCAL.address) -> Container:
    labels = attrs["Config"]["Labels"] or {}
    bindings = (attrs["NetworkSettings"].get("Ports") or {}).values()
    ports = [int(b["HostPort"]) for binding in bindings if binding for b in binding if b.get("HostPort")]
    networks = attrs["NetworkSettings"].get("Networks")
    port, address = _reached(labels, networks, ports[0] if ports else None, address)
    return Container(
        id=attrs["Id"],
        name=attrs["Name"].lstrip("/"),
        model=labels.get(MODEL, ""),
        state=attrs["State"]["Status"],
        host_port=port,
        spec_hash=labels.get(SPEC_HASH, ""),
        started_at=_epoch(attrs["State"].get("StartedAt")),
        image_id=attrs.get("Image", ""),
        placed=placed_ids(labels),
        address=address,
    )


def _from_summary(attrs: dict[str, Any], address: str = LOCAL.address) -> Container:
    labels = attrs.get("Labels") or {}
    ports = [p["PublicPort"] for p in attrs.get("Ports") or [] if p.get("PublicPort")]
    networks = (attrs.get("NetworkSettings") or {}).get("Networks")
    port, address = _reached(labels, networks, ports[0] if ports else None, address)
    return Container(
        id=attrs["Id"],
        name=(attrs.get("Names") or ["/"])[0].lstrip("/"),
        model=labels.get(MODEL, ""),
        state=attrs["State"],
        host_port=port,
        spec_hash=labels.get(SPEC_HASH, ""),
        started_at=float(attrs["Created"]) if attrs.get("Created") else None,
        image_id=attrs.get("ImageID", ""),
        placed=placed_ids(labels),
        address=address,
    )


def connect(engine: Engine) -> docker.DockerClient:
    """A client of `engine` (SDK errors raised as they come: callers translate them)."""
    if engine.docker is None:
        if os.environ.get("DOCKER_HOST", "").startswith("ssh://"):
            _ssh_transport()
        return docker.from_env(version="auto", timeout=engine.timeout)
    base_url, tls = engine.docker, _tls(engine)
    if engine.context is not None:
        found = docker.context.ContextAPI.get_context(engine.context)
        if found is None:
            raise docker.errors.DockerException(
                f"no Docker context named '{engine.context}' (docker context ls)"
            )
        base_url, tls = found.Host, found.TLSConfig or False
    if base_url.startswith("ssh://"):
        _ssh_transport()

    def client(version: str) -> docker.DockerClient:
        made = docker.DockerClient(
            base_url=base_url, version=version, timeout=engine.timeout, tls=tls, use_ssh_client=False
        )
        made.api.trust_env = False  # requests' REQUESTS_CA_BUNDLE would override the engine's CA
        return made

    # "auto" would ask the engine's API version before the environment is ignored: ask it here
    with contextlib.closing(client(MIN_API)) as first:
        version = str(first.version(api_version=False)["ApiVersion"])
    return client(version)


def _tls(engine: Engine) -> docker.tls.TLSConfig | bool:
    if engine.tls is None:
        return False
    found = engine.tls
    return docker.tls.TLSConfig(
        client_cert=(str(found.cert), str(found.key)) if found.cert and found.key else None,
        ca_cert=str(found.ca) if found.ca else None,
        verify=found.verify,
    )


class DockerBackend:
    """One Docker engine's containers: the local one (`LOCAL`) unless told another."""

    def __init__(self, engine: Engine = LOCAL, *, client: docker.DockerClient | None = None) -> None:
        self.engine = engine
        self._client = client
        self._networking = threading.Lock()  # one creation of a missing network at a time

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = self._call(lambda: connect(self.engine))
        return self._client

    def _call(self, action: Callable[[], T], model: str | None = None, image: str | None = None) -> T:
        """`action`'s result, with every SDK error translated, once, into swapctl's."""
        try:
            return action()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
            raise _translate(error, model, image, self.engine) from None
        except _socket_errors() as error:
            raise _unreachable(error, self.engine, model) from None

    def close(self) -> None:
        """Close the connection to the engine (an ssh:// one holds an ssh session open)."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closed already, or never opened
                client.close()

    def ping(self) -> bool:
        """Whether the engine answers now (within the engine's timeout)."""
        try:
            return bool(self._call(lambda: self.client.ping()))
        except BackendError:
            return False

    def _unless_gone(self, action: Callable[[], T]) -> T | None:
        """`action`'s result, or None when the container it asks about does not exist."""
        try:
            return self._call(action)
        except Gone:
            return None

    def list(self, instance: str) -> list[Container]:
        filters = {"label": [f"{MANAGED}=true", f"{INSTANCE}={instance}"]}
        api = self.client.api
        found = self._call(lambda: api.containers(all=True, filters=filters))
        return [_from_summary(c, self.engine.address) for c in found]

    def get(self, container_id: str) -> Container | None:
        found = self._unless_gone(lambda: self.client.api.inspect_container(container_id))
        return _from_inspect(found, self.engine.address) if found is not None else None

    def start(self, spec: ContainerSpec) -> Container:
        if spec.network is not None:
            self._call(lambda: self._ensure_network(str(spec.network)), spec.model)
        created = self._call(lambda: self._create(spec), spec.model, spec.image)
        try:
            self._join_networks(created.id, spec)
            self._call(created.start, spec.model, spec.image)
            for _ in range(50):  # the published port can lag the start by a moment
                found = self.get(created.id)
                if found is None or found.host_port is not None or not found.running:
                    break
                time.sleep(0.01)
        except BaseException:
            self._remove(created.id)  # a failed start leaves the container `created`
            raise
        if found is None:
            raise BackendError("the container vanished as it started", spec.model)
        return found

    def _ensure_network(self, name: str) -> None:
        """swapctl's network, created when missing: a bridge network labelled as swapctl's.
        It stays when the models go: swapctl itself may be on it (and Compose may own it)."""
        with self._networking:
            try:
                self.client.api.inspect_network(name)
                return
            except docker.errors.NotFound:
                pass
            try:
                self.client.api.create_network(
                    name, driver="bridge", labels={MANAGED: "true"}, check_duplicate=True
                )
            except docker.errors.APIError as error:
                if error.status_code != 409:  # another swapctl created it meanwhile
                    raise

    def _join_networks(self, container_id: str, spec: ContainerSpec) -> None:
        """The networks past the first: Docker's API before 1.44 takes one at creation."""
        for network in joined_networks(spec)[1:]:
            join = functools.partial(
                self.client.api.connect_container_to_network,
                container_id,
                network.name,
                aliases=list(network.aliases) or None,
            )
            self._call(join, spec.model)

    def _create(self, spec: ContainerSpec) -> Any:
        arguments = create_arguments(spec, self.engine.address)
        deadline, attempts = time.monotonic() + NAME_WAIT, 0
        while True:
            attempts += 1
            if attempts > 2:
                time.sleep(0.02)  # another thread is removing the leftover: wait for its name
            try:
                return self.client.containers.create(**arguments)
            except docker.errors.APIError as error:
                if error.status_code != 409 or time.monotonic() > deadline:
                    raise
            # the name is taken: by a leftover of ours (remove it), or by someone else (say so)
            holder = self._unless_gone(lambda: self.client.api.inspect_container(spec.name))
            if holder is None:
                continue  # removed meanwhile
            labels = holder["Config"]["Labels"] or {}
            if labels.get(INSTANCE) != spec.instance or labels.get(MANAGED) != "true":
                raise BackendError(
                    f"container name '{spec.name}' is taken by a container swapctl does not manage",
                    spec.model,
                ) from None
            self._remove(holder["Id"])  # returns at once when another thread is removing it

    def _remove(self, container_id: str) -> None:
        try:
            self._unless_gone(lambda: self.client.api.remove_container(container_id, force=True))
        except BackendError as error:
            if "is already in progress" not in str(error):
                raise

    def stop(self, container_id: str, grace: float) -> None:
        try:
            self._call(lambda: self.client.api.stop(container_id, timeout=math.ceil(grace)))
        except Gone:
            return  # removed already: nothing to stop
        self._remove(container_id)

    def image_id(self, image: str) -> str | None:
        try:
            found = self._call(lambda: self.client.api.inspect_image(image))
        except ImageMissing:
            return None
        return str(found["Id"])

    def pull(self, image: str, on_progress: PullListener) -> None:
        """The SDK's low-level stream, one decoded line per report. The SDK sends the
        credentials it finds for the image's registry in the user's Docker config
        ($DOCKER_CONFIG/config.json, else ~/.docker/config.json: `auths`, `credsStore`,
        `credHelpers`), read again here so that a `docker login` since counts."""
        repository, tag = docker.utils.parse_repository_tag(image)
        api = self.client.api
        try:
            api.reload_config()
            for line in api.pull(repository, tag=tag or "latest", stream=True, decode=True):
                if "error" in line:
                    raise pull_failure(image, str(line["error"]))
                on_progress(pull_report(line))
        except docker.errors.APIError as error:
            raise pull_failure(image, str(error.explanation or error)) from None
        except requests.exceptions.RequestException as error:
            raise _translate(error, engine=self.engine) from None
        except docker.errors.DockerException as error:  # a credential helper failed, say
            raise pull_failure(image, str(error)) from None

    def logs(self, container_id: str, tail: int = 50) -> str:
        raw = self._unless_gone(lambda: self.client.api.logs(container_id, tail=tail))
        return bytes(raw or b"").decode(errors="replace")

    def follow(self, container_id: str) -> _Follow:
        return _Follow(
            self._unless_gone(lambda: self.client.api.logs(container_id, stream=True, follow=True)),
            self.engine,
        )


class _Follow:
    """A container's log as the SDK streams it (None: the container is gone), cut into lines
    (an over-long one cut short: `split_lines`). `close` shuts the stream's socket, from any
    thread: a read waiting on it ends."""

    def __init__(self, stream: Any, engine: Engine = LOCAL) -> None:
        self.stream = stream
        self.engine = engine
        self.closed = False

    def __iter__(self) -> Iterator[str]:
        if self.stream is None:
            return
        try:
            yield from split_lines(self.stream)
        except Exception as error:
            if not self.closed:
                raise _translate(error, engine=self.engine) from error
            return  # closed under the read: the end, not an error

    def close(self) -> None:
        self.closed = True
        if self.stream is not None:
            with contextlib.suppress(Exception):  # closed already
                self.stream.close()
