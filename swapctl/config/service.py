"""PURE: the container settings of a model, parsed from their Compose forms into frozen values.

`file.py` calls the `parse_*` functions as validators (a ValueError becomes an error at the
key's path); `Model` holds the values, `ContainerSpec` copies them (and so hashes them), and
`backend/docker.py` alone turns them into the Docker SDK's arguments. The forms are
Compose's: https://docs.docker.com/reference/compose-file/services/
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Ulimit:
    """`ulimits: {nofile: {soft: 1024, hard: 2048}}`; -1 is unlimited."""

    name: str
    soft: int
    hard: int


@dataclass(frozen=True)
class DeviceRequest:
    """A Docker device request (`gpus:`, or Compose's `deploy.resources.reservations.devices`).
    `count` -1 means all; with `device_ids` it is None."""

    driver: str
    count: int | None
    device_ids: tuple[str, ...]
    capabilities: tuple[str, ...]
    options: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Network:
    """A user-defined Docker network the container joins, with its names on that network."""

    name: str
    aliases: tuple[str, ...] = ()


# Docker's ulimit names (go-units, https://github.com/docker/go-units/blob/master/ulimit.go).
ULIMIT_NAMES = frozenset(
    [
        "core",
        "cpu",
        "data",
        "fsize",
        "locks",
        "memlock",
        "msgqueue",
        "nice",
        "nofile",
        "nproc",
        "rss",
        "rtprio",
        "rttime",
        "sigpending",
        "stack",
    ]
)
MAX_LIMIT = 2**63 - 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CAPABILITY = re.compile(r"(?i)(?:CAP_)?[A-Z][A-Z0-9_]*")
PULL_POLICIES = ("missing", "if_not_present", "always", "never")


def parse_ulimits(value: object) -> tuple[Ulimit, ...]:
    """Compose's `ulimits`: `{nproc: 65535}` (soft and hard alike) or `{nofile: {soft, hard}}`."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping such as {{nofile: {{soft: 1024, hard: 4096}}}}, got {value!r}")
    return tuple(_ulimit(str(name), limit) for name, limit in value.items())


def _ulimit(name: str, limit: object) -> Ulimit:
    if name not in ULIMIT_NAMES:
        raise ValueError(f"unknown ulimit '{name}' (one of {', '.join(sorted(ULIMIT_NAMES))})")
    if isinstance(limit, dict):
        if set(limit) != {"soft", "hard"}:
            raise ValueError(f"{name}: expected {{soft: N, hard: N}}, got {limit!r}")
        soft, hard = _limit(name, limit["soft"]), _limit(name, limit["hard"])
    else:
        soft = hard = _limit(name, limit)
    if hard != -1 and (soft == -1 or soft > hard):
        raise ValueError(f"{name}: the soft limit {soft} is above the hard limit {hard}")
    return Ulimit(name, soft, hard)


def _limit(name: str, value: object) -> int:
    """A limit: an integer from -1 (unlimited) up, or such a string (Compose allows both)."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,19}", value.strip()):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and -1 <= value <= MAX_LIMIT:
        return value
    raise ValueError(f"{name}: expected a limit from -1 (unlimited) to {MAX_LIMIT}, got {value!r}")


def parse_names(value: object, what: str, pattern: re.Pattern[str] = _NAME) -> tuple[str, ...]:
    """A list of names (groups, options, capabilities...), numbers read as their digits."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of {what}, got {value!r}")
    names = tuple(
        str(item) if isinstance(item, int) and not isinstance(item, bool) else item for item in value
    )
    for name in names:
        if not isinstance(name, str) or not pattern.fullmatch(name):
            raise ValueError(f"expected a list of {what}, got {name!r} in it")
    return names


def parse_capabilities(value: object) -> tuple[str, ...]:
    return parse_names(value, "Linux capabilities such as SYS_NICE or CAP_IPC_LOCK", _CAPABILITY)


def parse_tmpfs(value: object) -> tuple[str, ...]:
    """Compose's `tmpfs`: one `/path[:options]` or a list of them, each path once."""
    entries = [value] if isinstance(value, str) else value
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.startswith("/") for e in entries):
        raise ValueError(
            f"expected an absolute path such as '/tmp:size=64m', or a list of them, got {value!r}"
        )
    paths = [entry.partition(":")[0] for entry in entries]
    if len(set(paths)) != len(paths):
        raise ValueError("a path is mounted twice")
    return tuple(entries)


def parse_extra_hosts(value: object) -> tuple[str, ...]:
    """Compose's `extra_hosts` (`["name:IP"]`, `["name=IP"]`, or `{name: IP or [IPs]}`) as
    Docker's `name:IP` entries."""
    if isinstance(value, dict):
        pairs = [
            (str(host), ip) for host, ips in value.items() for ip in (ips if isinstance(ips, list) else [ips])
        ]
    elif isinstance(value, list) and all(isinstance(item, str) for item in value):
        pairs = [_host_entry(item) for item in value]
    else:
        raise ValueError(f"expected a list of 'name:IP' or a mapping of name to IP, got {value!r}")
    return tuple(f"{host}:{_host_ip(host, ip)}" for host, ip in pairs)


def _host_entry(entry: str) -> tuple[str, object]:
    host, sep, ip = entry.partition("=") if "=" in entry else entry.partition(":")
    if not sep:
        raise ValueError(f"expected 'name:IP' or 'name=IP', got {entry!r}")
    return host, ip


def _host_ip(host: str, ip: object) -> str:
    text = str(ip).strip().removeprefix("[").removesuffix("]")
    if not _NAME.fullmatch(host):
        raise ValueError(f"expected a host name, got {host!r}")
    if text == "host-gateway":  # Docker's name for the host's address on the bridge
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{host}: expected an IP address or host-gateway, got {ip!r}") from None


def parse_network_mode(value: object) -> str:
    """`bridge`, `default`, or a user-defined network's name: modes where a port can be
    published, which is how swapctl reaches the server."""
    if not isinstance(value, str):
        raise ValueError(f"expected a network mode, got {value!r}")
    if value == "host":
        raise ValueError(
            "'host' is not supported: swapctl reaches a model through its port published on "
            "127.0.0.1, and a host-network container publishes none; use bridge or a network of yours"
        )
    if value == "none" or value.startswith(("container:", "service:")):
        raise ValueError(
            f"'{value}' is not supported: the container would publish no port for swapctl to reach"
        )
    if not _NAME.fullmatch(value):
        raise ValueError(f"expected bridge, default or a network name, got {value!r}")
    return value


def parse_networks(value: object) -> tuple[Network, ...]:
    """Compose's `networks`: a list of names, or a mapping of name to null or `{aliases}`.
    Each must exist already (docker network create NAME): swapctl has no project to create them."""
    if isinstance(value, list):
        value = dict.fromkeys(value)
    if not isinstance(value, dict) or not value:
        raise ValueError(f"expected a list of network names or a mapping of them, got {value!r}")
    return tuple(_network(name, options) for name, options in value.items())


def _network(name: object, options: object) -> Network:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in ("host", "none", "default"):
        raise ValueError(f"expected the name of a network created with `docker network create`, got {name!r}")
    if options is None:
        return Network(name)
    if not isinstance(options, dict):
        raise ValueError(f"{name}: expected null or {{aliases: [...]}}, got {options!r}")
    for key in options:
        if key != "aliases":
            raise ValueError(f"{name}.{key}: only 'aliases' is supported in a network")
    return Network(name, parse_names(options.get("aliases") or [], "aliases"))


def parse_network(value: object) -> str:
    """The top-level `network`: the bridge network swapctl puts every model on and reaches
    each through (created when missing); not one of Docker's own modes."""
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in ("host", "none", "default"):
        raise ValueError(f"expected a network's name (letters, digits, '_', '.', '-'), got {value!r}")
    return value


def parse_pull_policy(value: object) -> str:
    """Compose's `pull_policy`: `missing` (`if_not_present`) pulls an absent image, `always`
    pulls before every start, `never` pulls nothing."""
    if value in PULL_POLICIES:
        return "missing" if value == "if_not_present" else str(value)
    if value == "build":
        raise ValueError(
            "'build' is not supported: swapctl builds no images; build it (docker build -t NAME .) "
            "and use missing or never"
        )
    raise ValueError(f"expected missing, if_not_present, always or never, got {value!r}")
