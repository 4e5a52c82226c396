"""A Docker engine swapctl drives, as a value: where its API answers, how the two trust each
other, and the address its containers publish their port on (where swapctl reaches them).

The local engine (`LOCAL`) is the one the environment names (DOCKER_HOST, else the local
socket), its containers reached on 127.0.0.1. Another machine's engine is reached by

    unix:///path/docker.sock    a socket of this machine
    tcp://HOST:PORT             Docker's TCP API, with mutual TLS (`tls`) unless told otherwise
    ssh://[USER@]HOST[:PORT]    Docker's API through ssh: the user's ~/.ssh/config and known_hosts
    NAME                        a Docker context (`docker context create`): its host and TLS files

Nothing here connects: `swapctl.backend.docker.DockerBackend(engine)` does. The values live
with the config, which reads them from `hosts:` (`parse_hosts`), as the backend reads config.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from swapctl.errors import ConfigError

if TYPE_CHECKING:
    from swapctl.config.file import HostConfig, HostTlsConfig

LOCAL_NAME = "local"
LOCAL_ADDRESS = "127.0.0.1"
DEFAULT_TIMEOUT = 60.0  # seconds an engine call may take to answer (a stop adds its grace)
SCHEMES = ("unix", "tcp", "ssh")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_CONTEXT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # as the docker CLI names contexts


@dataclass(frozen=True)
class Tls:
    """Mutual TLS to a tcp:// engine: the CA that signed the engine's certificate, and the
    certificate and key this side shows it (as `docker --tlsverify --tlscacert --tlscert --tlskey`)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    verify: bool = True  # check the engine's certificate against `ca`

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if self.verify and self.ca is None:
            raise ValueError("verify needs the CA that signed the engine's certificate (ca)")


@dataclass(frozen=True)
class Engine:
    name: str = LOCAL_NAME  # the host's name in the config; `local` for this machine's engine
    docker: str | None = None  # a URL (SCHEMES) or a Docker context's name; None: the environment's
    tls: Tls | None = None
    address: str = LOCAL_ADDRESS  # where its containers publish their port and are reached
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.docker is not None:
            check_docker(self.docker)
        if self.tls is not None and self.scheme not in ("tcp", None):
            raise ValueError(f"tls applies to a tcp:// engine, not to {self.docker!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be more than 0 seconds, got {self.timeout!r}")

    @property
    def scheme(self) -> str | None:
        """unix, tcp or ssh; None for a context or the environment's engine."""
        if self.docker is None or "://" not in self.docker:
            return None
        return self.docker.partition("://")[0]

    @property
    def context(self) -> str | None:
        """The Docker context it names, if it names one."""
        return self.docker if self.docker is not None and "://" not in self.docker else None

    @property
    def where(self) -> str:
        """The engine as errors name it: `host 'gpu2' (tcp://10.0.0.2:2376)`."""
        return f"host '{self.name}' ({self.docker or 'DOCKER_HOST or the local socket'})"


LOCAL = Engine()


def check_docker(value: str) -> str:
    """`value` if it names an engine as `Engine.docker` can: a URL of SCHEMES with a host (a
    path for unix://), or a context name; ValueError else."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        if not _CONTEXT.fullmatch(value):
            raise ValueError(
                f"expected unix://PATH, tcp://HOST:PORT, ssh://[USER@]HOST[:PORT] or a Docker context's name, got {value!r}"
            )
        return value
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme '{scheme}://' (expected {', '.join(s + '://' for s in SCHEMES)})")
    if not rest or (scheme == "unix" and not rest.startswith("/")):
        raise ValueError(f"{scheme}:// needs {'an absolute path' if scheme == 'unix' else 'a host'}")
    return value


def check_address(value: str | None) -> str | None:
    """An IP address (v4 or v6), as Docker publishes ports on; ValueError else."""
    if value is not None:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"expected an IP address, got {value!r}") from None
    return value


def parse_hosts(hosts: Mapping[str, HostConfig], base_dir: Path) -> dict[str, Engine]:
    """The file's `hosts` as Engines, `local` (this machine's) first; paths relative to
    `base_dir`, each checked to exist; an error names its key path."""
    found = {LOCAL_NAME: LOCAL}
    for name, own in hosts.items():
        where = f"hosts.{name}"
        if name == LOCAL_NAME:
            raise ConfigError(
                where, f"'{LOCAL_NAME}' is this machine's engine, always there: name others otherwise"
            )
        if not _NAME.fullmatch(name):
            raise ConfigError(
                where, "a host's name is letters, digits, '_', '.' and '-', a letter or digit first"
            )
        tls = _tls(own.tls, base_dir, f"{where}.tls") if own.tls is not None else None
        address = own.address or _url_ip(own.docker)
        if address is None:
            raise ConfigError(f"{where}.address", "required key is missing (the docker URL names no IP)")
        try:
            found[name] = Engine(name, own.docker, tls, address, own.timeout)
        except ValueError as error:
            raise ConfigError(f"{where}.tls" if tls else where, str(error)) from None
    return found


def _tls(own: HostTlsConfig, base_dir: Path, where: str) -> Tls:
    paths: dict[str, Path | None] = {}
    for key in ("ca", "cert", "key"):
        text = getattr(own, key)
        path = None if text is None else (base_dir / Path(text).expanduser())
        if path is not None and not path.is_file():
            raise ConfigError(f"{where}.{key}", f"file not found: {path}")
        paths[key] = path
    try:
        return Tls(paths["ca"], paths["cert"], paths["key"], own.verify)
    except ValueError as error:
        raise ConfigError(where, str(error)) from None


def _url_ip(docker: str) -> str | None:
    """The IP a tcp:// or ssh:// URL names, if it names one."""
    host = urlsplit(docker).hostname if "://" in docker else None
    try:
        return str(ipaddress.ip_address(host)) if host else None
    except ValueError:
        return None
