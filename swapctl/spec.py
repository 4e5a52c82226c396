"""PURE: a model's configuration -> the container to run, its labels and its spec hash.

The daemon is the database: labels say which instance and model a container belongs to,
and the hash says whether it still matches the configuration (adopt it) or not (replace it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from swapctl.config import Config

MANAGED = "swapctl.managed"
MODEL = "swapctl.model"
INSTANCE = "swapctl.instance"
SPEC_HASH = "swapctl.spec-hash"


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

    @property
    def spec_hash(self) -> str:
        return self.labels[SPEC_HASH]


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
    )
    digest = hashlib.sha256(json.dumps(asdict(spec), sort_keys=True, default=list).encode()).hexdigest()
    labels = {**m.labels, MANAGED: "true", MODEL: model, INSTANCE: config.instance, SPEC_HASH: digest[:16]}
    return ContainerSpec(**{**asdict(spec), "labels": labels})


def device_requests(gpus: str | int | tuple[str, ...] | None) -> list[dict[str, object]]:
    """Compose's `gpus` as Docker device requests (the SDK's DeviceRequest keywords)."""
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
