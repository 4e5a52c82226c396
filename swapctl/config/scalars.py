"""PURE: the scalars of the file that YAML and pydantic cannot check alone, each bounded.

Durations (`1m30s`), sizes (`64m`) and listen addresses (`HOST:PORT`) are parsed here, and
every number in the file has its bound here: a value past one is a typo, and an unbounded
one (`.inf`, `1e300`) would pass and fail later, when a container is stopped or a timer set.
"""

from __future__ import annotations

import ipaddress
import re

from swapctl.matrix.fit import format_gpu_memory as format_gpu_memory  # printed by the pure core

DURATION = re.compile(
    r"(?:([0-9]+(?:\.[0-9]+)?)h)?(?:([0-9]+(?:\.[0-9]+)?)m(?!s))?(?:([0-9]+(?:\.[0-9]+)?)s)?(?:([0-9]+)ms)?"
)
MAX_DURATION = 30 * 86400  # seconds: ttl, globalTTL
MAX_GRACE = 3600  # seconds between the stop signal and a kill
DEFAULT_GRACE = 10.0  # seconds, also for a leftover container of a model no longer configured
MAX_HEALTH_TIMEOUT = 86400
MAX_CONCURRENCY = 100_000
MAX_REQUEST_BYTES = 16 * 2**30
MAX_SHM_BYTES = 2**40
MAX_GPUS = 1024
MAX_CPUS = 4096  # `cpus`: a fraction of the machine's cores, as many as the biggest machines have
MIN_MEMORY = 6 * 2**20  # Docker refuses a memory limit under 6 MiB
MAX_MEMORY = 2**48  # 256 TiB
MAX_GPU_MEMORY = 2**40  # 1 TiB on one GPU: `hardware.gpus[].memory`, a model's `vram`


def parse_duration(value: object, maximum: float = MAX_DURATION) -> float:
    """Seconds from a number or a Compose duration such as `1m30s` or `500ms`, finite and
    from 0 to `maximum` (NaN, infinities and huge numbers would overflow a timer later)."""
    amount: float
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        amount = value
    else:
        match = DURATION.fullmatch(value) if isinstance(value, str) and value else None
        if not match:
            raise ValueError(f"expected seconds or a duration such as '10s' or '1m30s', got {value!r}")
        hours, minutes, seconds, millis = (float(part or 0) for part in match.groups())
        amount = hours * 3600 + minutes * 60 + seconds + millis / 1000
    if not 0 <= amount <= maximum:  # also false for NaN
        raise ValueError(f"expected a duration from 0 to {maximum:g} seconds, got {value!r}")
    return float(amount)


SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(?:([bkmgBKMG])[bB]?)?")
_UNITS = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def check_size(value: object, maximum: int = MAX_SHM_BYTES) -> str | int:
    """`value` unchanged when it is a byte count or a size Docker reads (`64m`, `1.5gb`) from
    0 to `maximum`; Docker itself would refuse it only when the container is created."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
        return value
    match = SIZE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, str) and match and float(match[1]) * _UNITS[(match[2] or "b").lower()] <= maximum:
        return value
    raise ValueError(
        f"expected a size in bytes, or such as '64m' or '1g', from 0 to {maximum}, got {value!r}"
    )


def parse_size(value: object, minimum: int, maximum: int) -> int:
    """Bytes from a byte count or a size Docker reads (`512m`, `1.5g`), from minimum to maximum."""
    checked = check_size(value, maximum)
    if isinstance(checked, str):
        match = SIZE.fullmatch(checked)
        assert match is not None  # check_size matched it
        checked = int(float(match[1]) * _UNITS[(match[2] or "b").lower()])
    if checked < minimum:
        raise ValueError(f"expected a size of at least {minimum} bytes, got {value!r}")
    return checked


GPU_MEMORY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(?:([kKmMgGtT])(?:i?[bB])?|[bB])?")
_GPU_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_gpu_memory(value: object) -> int:
    """Bytes of GPU memory from a byte count or a size as GPU tools print it (`24GiB`, `24G`,
    `24000MiB`), from 1 byte to MAX_GPU_MEMORY. Every unit is binary: a card sold as 24 GB
    holds 24 GiB, as nvidia-smi shows it, and Docker reads `1g` as 2**30 too."""
    amount: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        amount = value
    elif isinstance(value, str) and (match := GPU_MEMORY.fullmatch(value.strip())):
        amount = float(match[1]) * _GPU_UNITS.get((match[2] or "b").lower(), 1)
    if amount is None:
        raise ValueError(f"expected bytes, or a size such as '24GiB', '24G' or '24000MiB', got {value!r}")
    if not 1 <= amount <= MAX_GPU_MEMORY:
        raise ValueError(f"expected a size from 1 byte to {MAX_GPU_MEMORY // 2**30} GiB, got {value!r}")
    return int(amount)


def parse_cpus(value: object) -> float:
    """Compose's `cpus`: how many of the machine's CPUs the container may use (`1.5`, "0.5")."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]+(?:\.[0-9]+)?", value.strip()):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_CPUS:
        return float(value)
    raise ValueError(f"expected a number of CPUs above 0 and at most {MAX_CPUS}, such as 1.5, got {value!r}")


_PORT = re.compile(r"[1-9][0-9]{0,4}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _host_problem(host: str) -> str | None:
    """What is wrong with the HOST of HOST:PORT, or None: empty, IPv4, [IPv6], or an RFC 1123 name."""
    if not host:
        return None
    if host.startswith("[") or host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1] if host[:1] + host[-1:] == "[]" else host)
        except ValueError:
            return "an IPv6 address in brackets, such as [::1]"
        return None
    if ":" in host:
        return "an IPv6 address in brackets, such as [::1]:8080"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return "an IPv4 address of four numbers 0-255"
        return None
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels) or labels[-1].isdigit():
        return "a host name of letters, digits and '-' (labels of 1-63, dot-separated)"
    return None


def host_of(value: str) -> str:
    """The name or address of a Host header or a listen address: without its port, IPv6
    brackets and trailing dot, lower-cased, so the forms a client may send compare equal."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:  # more than one: a bare IPv6 address, no port
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback(host: str) -> bool:
    """Only this machine reaches it: localhost, *.localhost, 127.0.0.0/8, ::1."""
    host = host_of(host)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) from HOST:PORT, as the config's `listen` and `up --listen` give it: HOST is
    an IPv4 address, a bracketed IPv6 address (returned without brackets), a host name, or
    empty for all interfaces (returned as 0.0.0.0); PORT is 1-65535."""
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not _PORT.fullmatch(port) or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT with a port from 1 to 65535, got {text!r}")
    if problem := _host_problem(host):
        raise ValueError(f"expected HOST:PORT with HOST {problem}, got {text!r}")
    return (host[1:-1] if host.startswith("[") else host or "0.0.0.0"), int(port)
