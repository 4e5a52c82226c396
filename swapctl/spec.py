"""PURE: a model's configuration -> the container to run, its labels and its spec hash.

The daemon is the database: labels say which instance and model a container belongs to,
and the hash says whether it still matches the configuration (adopt it) or not (replace it).
A key added to the spec later enters the hash only when it is set, so adding one leaves
the hash of every container that does not use it unchanged (and running, after an upgrade).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from swapctl.config import Config, DeviceRequest, Network, Ulimit

MANAGED = "swapctl.managed"
MODEL = "swapctl.model"
INSTANCE = "swapctl.instance"
SPEC_HASH = "swapctl.spec-hash"
PLACED = "swapctl.gpus"  # the GPU device IDs swapctl chose for a count request, comma-separated
NETWORK = "swapctl.network"  # the network swapctl reaches it on (top-level `network`), when set
PORT = "swapctl.port"  # its server's port on that network


@dataclass(frozen=True)
class ContainerSpec:
    model: str
    instance: str
    name: str
    image: str
    port: int
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    environment: Mapping[str, str] = field(default_factory=dict)
    volumes: tuple[str, ...] = ()
    gpus: str | int | tuple[str, ...] | None = None
    shm_size: str | int | None = None
    working_dir: str | None = None
    user: str | None = None
    ipc: str | None = None
    devices: tuple[str, ...] = ()
    stop_signal: str | None = None
    stop_grace_period: float = 10.0
    labels: Mapping[str, str] = field(default_factory=dict)
    # keys added after the first release: in the hash only when set (see the docstring)
    ulimits: tuple[Ulimit, ...] = field(default=(), metadata={"hash": "when set"})
    runtime: str | None = field(default=None, metadata={"hash": "when set"})
    group_add: tuple[str, ...] = field(default=(), metadata={"hash": "when set"})
    security_opt: tuple[str, ...] = field(default=(), metadata={"hash": "when set"})
    cap_add: tuple[str, ...] = field(default=(), metadata={"hash": "when set"})
    cap_drop: tuple[str, ...] = field(default=(), metadata={"hash": "when set"})
    tmpfs: tuple[str, ...] = field(default=(), metadata={"hash": "when set"})
    mem_limit: int | None = field(default=None, metadata={"hash": "when set"})
    cpus: float | None = field(default=None, metadata={"hash": "when set"})
    device_requests: tuple[DeviceRequest, ...] = field(default=(), metadata={"hash": "when set"})
    extra_hosts: tuple[str, ...] = field(default=(), metadata={"hash": "when set"})
    network_mode: str | None = field(default=None, metadata={"hash": "when set"})
    networks: tuple[Network, ...] = field(default=(), metadata={"hash": "when set"})
    # the top-level `network`: joined first, reached there on `port`, nothing published
    network: str | None = field(default=None, metadata={"hash": "when set"})
    # how to get the image, not what runs: changing it replaces no container
    pull_policy: str = field(default="missing", metadata={"hash": "never"})

    @property
    def spec_hash(self) -> str:
        return self.labels[SPEC_HASH]


def placed_ids(labels: Mapping[str, str]) -> tuple[str, ...]:
    """The GPU device IDs a container's labels say swapctl placed it on; () where it did not."""
    return tuple(filter(None, labels.get(PLACED, "").split(",")))


def container_name(instance: str, model: str) -> str:
    """A valid, stable container name; a short digest keeps distinct model IDs distinct."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model).strip("-.") or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:6]
    return f"swapctl-{instance}-{slug[:40]}-{digest}"


def _volume(entry: str, base_dir: Path) -> str:
    host, sep, rest = entry.partition(":")
    if sep and (host.startswith(".") or host.startswith("~")):
        host = str((base_dir / Path(host).expanduser()).resolve())
    return f"{host}{sep}{rest}"


def build_spec(config: Config, model: str) -> ContainerSpec:
    m = config.models[model]
    spec = ContainerSpec(
        model=model,
        instance=config.instance,
        name=container_name(config.instance, model),
        image=m.image,
        port=m.port,
        command=m.command,
        entrypoint=m.entrypoint,
        environment=dict(m.environment),
        volumes=tuple(_volume(v, config.base_dir) for v in m.volumes),
        gpus=m.gpus,
        shm_size=m.shm_size,
        working_dir=m.working_dir,
        user=m.user,
        ipc=m.ipc,
        devices=m.devices,
        stop_signal=m.stop_signal,
        stop_grace_period=m.stop_grace_period,
        labels=dict(m.labels),
        ulimits=m.ulimits,
        runtime=m.runtime,
        group_add=m.group_add,
        security_opt=m.security_opt,
        cap_add=m.cap_add,
        cap_drop=m.cap_drop,
        tmpfs=m.tmpfs,
        mem_limit=m.mem_limit,
        cpus=m.cpus,
        device_requests=m.device_requests,
        extra_hosts=m.extra_hosts,
        network_mode=m.network_mode,
        networks=m.networks,
        network=config.network,
        pull_policy=m.pull_policy,
    )
    digest = hashlib.sha256(json.dumps(_hashed(spec), sort_keys=True, default=list).encode()).hexdigest()
    labels = {**m.labels, MANAGED: "true", MODEL: model, INSTANCE: config.instance, SPEC_HASH: digest[:16]}
    if config.network is not None:
        labels |= {NETWORK: config.network, PORT: str(m.port)}
    return replace(spec, labels=labels)


def joined_networks(spec: ContainerSpec) -> tuple[Network, ...]:
    """The networks the container joins, in order: swapctl's `network` first (with the
    aliases the model's own `networks` give it there), then the model's others."""
    if spec.network is None:
        return spec.networks
    own = next((n for n in spec.networks if n.name == spec.network), Network(spec.network))
    return (own, *(n for n in spec.networks if n.name != spec.network))


def _hashed(spec: ContainerSpec) -> dict[str, Any]:
    """What the spec hash covers: every key, but those added later while unset and those
    that do not change the container."""
    values = asdict(spec)
    for key in fields(spec):
        rule = key.metadata.get("hash")
        if rule == "never" or (rule == "when set" and getattr(spec, key.name) == key.default):
            del values[key.name]
    return values


def device_requests(spec: ContainerSpec) -> list[dict[str, object]]:
    """The spec's device requests (`gpus:`, or Compose's `deploy.resources.reservations.devices`,
    never both) as the SDK's DeviceRequest keywords: one AND-list of capabilities each, as
    Compose sends them (https://github.com/docker/compose/blob/main/pkg/compose/create.go)."""
    return [*_gpus(spec.gpus), *(_request(device) for device in spec.device_requests)]


def _gpus(gpus: str | int | tuple[str, ...] | None) -> list[dict[str, object]]:
    """Compose's `gpus` (as `docker run --gpus`)."""
    if gpus is None:
        return []
    request: dict[str, object] = {"driver": "", "capabilities": [["gpu"]]}
    if gpus == "all":
        request["count"] = -1
    elif isinstance(gpus, int):
        request["count"] = gpus
    else:
        request["device_ids"] = list(gpus)
    return [request]


def _request(device: DeviceRequest) -> dict[str, object]:
    request: dict[str, object] = {"driver": device.driver, "capabilities": [list(device.capabilities)]}
    if device.device_ids:
        request["device_ids"] = list(device.device_ids)
    else:
        request["count"] = device.count
    if device.options:
        request["options"] = dict(device.options)
    return request
