"""PURE: Compose as users write it, turned into the document `file.py` validates.

`compose_document` does what Compose does before it reads a service: top-level and
service-level `x-*` keys are dropped (they hold YAML anchors, and swapctl's `x-swapctl` in
templates), each model's template is merged under it, every string value is interpolated
(`interpolation.py`) from the environment and the `.env` beside the config, numbers and
booleans that came from a variable are read as such, and `environment` entries without a
value take theirs from the environment. `apply_env_files` then merges `env_file:` under
`environment`. The lists of Compose keys here tell "a Compose key swapctl does not
support" from "a key nobody knows" (a typo).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swapctl.config.envfile import parse_env_file
from swapctl.config.interpolation import InterpolationError, substitute
from swapctl.config.templates import apply_template
from swapctl.errors import ConfigError

# Every key of a Compose service, from the Compose Specification's schema
# (https://github.com/compose-spec/compose-go/blob/main/schema/compose-spec.json, `service`).
COMPOSE_SERVICE_KEYS = frozenset(
    [
        "annotations",
        "attach",
        "blkio_config",
        "build",
        "cap_add",
        "cap_drop",
        "cgroup",
        "cgroup_parent",
        "command",
        "configs",
        "container_name",
        "cpu_count",
        "cpu_percent",
        "cpu_period",
        "cpu_quota",
        "cpu_rt_period",
        "cpu_rt_runtime",
        "cpu_shares",
        "cpus",
        "cpuset",
        "credential_spec",
        "depends_on",
        "deploy",
        "develop",
        "device_cgroup_rules",
        "devices",
        "dns",
        "dns_opt",
        "dns_search",
        "domainname",
        "entrypoint",
        "env_file",
        "environment",
        "expose",
        "extends",
        "external_links",
        "extra_hosts",
        "gpus",
        "group_add",
        "healthcheck",
        "hostname",
        "image",
        "init",
        "ipc",
        "isolation",
        "label_file",
        "labels",
        "links",
        "logging",
        "mac_address",
        "mem_limit",
        "mem_reservation",
        "mem_swappiness",
        "memswap_limit",
        "models",
        "network_mode",
        "networks",
        "oom_kill_disable",
        "oom_score_adj",
        "pid",
        "pids_limit",
        "platform",
        "ports",
        "post_start",
        "pre_start",
        "pre_stop",
        "privileged",
        "profiles",
        "provider",
        "pull_policy",
        "pull_refresh_after",
        "read_only",
        "restart",
        "runtime",
        "scale",
        "secrets",
        "security_opt",
        "shm_size",
        "stdin_open",
        "stop_grace_period",
        "stop_signal",
        "storage_opt",
        "sysctls",
        "tmpfs",
        "tty",
        "ulimits",
        "use_api_socket",
        "user",
        "userns_mode",
        "uts",
        "volumes",
        "volumes_from",
        "working_dir",
    ]
)
# The Compose keys below a service key, where swapctl reads some of them (same schema).
COMPOSE_NESTED_KEYS: Mapping[tuple[str, ...], frozenset[str]] = {
    ("deploy",): frozenset(
        [
            "endpoint_mode",
            "labels",
            "mode",
            "placement",
            "replicas",
            "resources",
            "restart_policy",
            "rollback_config",
            "update_config",
        ]
    ),
    ("deploy", "resources"): frozenset({"limits", "reservations"}),
    ("deploy", "resources", "limits"): frozenset({"cpus", "memory", "pids"}),
    ("deploy", "resources", "reservations"): frozenset({"cpus", "memory", "generic_resources", "devices"}),
    ("deploy", "resources", "reservations", "devices", "*"): frozenset(
        {"capabilities", "count", "device_ids", "driver", "options"}
    ),
    ("networks", "*"): frozenset(
        [
            "aliases",
            "ipv4_address",
            "ipv6_address",
            "link_local_ips",
            "mac_address",
            "priority",
            "gw_priority",
            "driver_opts",
            "interface_name",
        ]
    ),
    ("env_file", "*"): frozenset({"path", "required", "format"}),
}
# What to do instead, for the unsupported keys people bring most.
_INSTEAD = {
    "build": "build the image first (docker build -t NAME .) and name it in `image`",
    "ports": "swapctl publishes `port` itself, on 127.0.0.1, with a host port Docker picks",
    "expose": "set `port`, the port the server listens on inside the container",
    "healthcheck": "set `health`, the HTTP path swapctl polls until it answers 200 (or none)",
    "container_name": "swapctl names each model's container itself",
    "restart": "a model that crashed starts again on its next request",
    "depends_on": "each model is one container, started when a request needs it",
    "links": "put the containers on one network (`networks`) instead",
    "extends": "use `template:`, or YAML anchors and merge keys (`<<: *name`)",
    "secrets": "mount the file with `volumes`, or pass it with `env_file`",
    "configs": "mount the file with `volumes`",
    "scale": "each model is one container",
    "privileged": "grant what the server needs with `cap_add`, `devices` and `security_opt`",
}
# Values that are numbers or booleans, as compose-go casts them after interpolation
# (https://github.com/compose-spec/compose-go/blob/main/loader/interpolate.go): only a value
# that came from a variable is cast, so a number written in quotes stays an error.
_INTEGERS = (
    ("models", "*", "port"),
    ("models", "*", "ttl"),
    ("models", "*", "healthCheckTimeout"),
    ("models", "*", "concurrencyLimit"),
    ("models", "*", "gpus"),
    ("models", "*", "stop_grace_period"),
    ("healthCheckTimeout",),
    ("globalTTL",),
    ("maxRequestBytes",),
    ("requestRecord",),
    ("captureBuffer",),
    ("matrix", "evict_costs", "*"),
)
_BOOLEANS = (
    ("groups", "*", "swap"),
    ("groups", "*", "exclusive"),
    ("groups", "*", "persistent"),
    ("models", "*", "sendLoadingState"),
    ("sendLoadingState",),
)
KeyPath = tuple[str | int, ...]


def unsupported_key(location: Sequence[str | int]) -> str | None:
    """For an unknown key of a model at pydantic's `location` (models, ID, ..., key): what to
    say when Compose knows the key and swapctl does not support it; None when Compose does not
    know it either (a typo)."""
    if len(location) < 3 or location[0] != "models":
        return None
    *parents, key = ("*" if isinstance(part, int) else str(part) for part in location[2:])
    known = COMPOSE_NESTED_KEYS.get(tuple(parents), frozenset()) if parents else COMPOSE_SERVICE_KEYS
    if key not in known:
        return None
    instead = _INSTEAD.get(key) if not parents else None
    return f"'{key}' is a Compose key swapctl does not support" + (f": {instead}" if instead else "")


@dataclass(frozen=True)
class Composed:
    """The document after Compose's reading, before validation."""

    document: dict[str, Any]
    environ: Mapping[str, str]  # what it was interpolated from (env files are interpolated from it too)
    warnings: tuple[str, ...]  # variables that were not set, by key path


def compose_document(
    raw: object, templates: Mapping[str, Mapping[str, Any]], environ: Mapping[str, str]
) -> Composed:
    """Templates merged, `x-*` keys dropped, every string interpolated from `environ`."""
    if not isinstance(raw, dict):
        raise ConfigError(
            "", f"the configuration must be a mapping with a 'models:' key, got {type(raw).__name__}"
        )
    document = _without_extensions(raw)
    models = document.get("models")
    if isinstance(models, dict):
        document["models"] = {
            name: _without_extensions(apply_template(name, model, templates))
            if isinstance(model, dict)
            else model
            for name, model in models.items()
        }
    warnings: list[str] = []
    document = _interpolate(document, (), environ, warnings)  # a copy: changed below
    models = document.get("models")
    for model in models.values() if isinstance(models, dict) else ():
        if isinstance(model, dict) and "environment" in model:
            model["environment"] = _passed_environment(model["environment"], environ)
    return Composed(document, environ, tuple(warnings))


def _without_extensions(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    """`x-*` keys are Compose's extension fields: places for anchors, ignored otherwise."""
    return {
        key: value for key, value in mapping.items() if not (isinstance(key, str) and key.startswith("x-"))
    }


def _dotted(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)


def _interpolate(value: Any, path: KeyPath, environ: Mapping[str, str], warnings: list[str]) -> Any:
    """A copy of `value` with its strings interpolated (keys are not, as in Compose). A copy:
    YAML aliases share one object between several places."""
    if isinstance(value, dict):
        return {key: _interpolate(item, (*path, key), environ, warnings) for key, item in value.items()}
    if isinstance(value, list):
        return [_interpolate(item, (*path, index), environ, warnings) for index, item in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value
    try:
        found = substitute(value, environ)
    except InterpolationError as error:
        raise ConfigError(_dotted(path), str(error)) from None
    if path[:1] == ("apiKeys",) and (found.unset or found.empty):  # a key is never silently empty
        name = (found.unset + found.empty)[0]
        raise ConfigError(_dotted(path), f"environment variable {name} is not set or empty")
    warnings.extend(
        f"{_dotted(path)}: variable {name} is not set; using an empty string" for name in found.unset
    )
    return _cast(found.text, path) if found.substituted else found.text


def _matches(path: KeyPath, patterns: tuple[tuple[str, ...], ...]) -> bool:
    return any(
        len(pattern) == len(path)
        and all(p in ("*", str(part)) for p, part in zip(pattern, path, strict=True))
        for pattern in patterns
    )


def _cast(text: str, path: KeyPath) -> object:
    if _matches(path, _INTEGERS) and re.fullmatch(r"-?[0-9]{1,18}", text.strip()):
        return int(text)
    if _matches(path, _BOOLEANS) and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    return text


def _passed_environment(value: object, environ: Mapping[str, str]) -> object:
    """`environment` as a mapping, where an entry without a value (`- NAME`, `NAME:`) takes
    NAME's value from the environment, or is left out when it has none, as in Compose."""
    if isinstance(value, list):
        pairs = [str(item).partition("=") for item in value]
        value = {key: (item if sep else None) for key, sep, item in pairs}
    if not isinstance(value, dict):
        return value
    return {
        key: environ[key] if item is None else item
        for key, item in value.items()
        if item is not None or key in environ
    }


@dataclass(frozen=True)
class EnvFile:
    """One `env_file:` entry of a model, its path resolved."""

    model: str
    where: str  # its key path
    path: Path
    required: bool


def env_file_entries(value: object) -> list[tuple[str, bool]]:
    """(path, required) of each entry of `env_file`: a path, or a list of paths and
    `{path, required}` mappings (Compose's long form); else ValueError."""
    if isinstance(value, str):
        return [(value, True)]
    if not isinstance(value, list):
        raise ValueError(f"expected a path or a list of paths, got {type(value).__name__}")
    return [_env_file_entry(item) for item in value]


def _env_file_entry(item: object) -> tuple[str, bool]:
    if isinstance(item, str) and item:
        return item, True
    if isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
        unknown = set(item) - {"path", "required"}
        if unknown:
            key = sorted(map(str, unknown))[0]
            known = key in COMPOSE_NESTED_KEYS[("env_file", "*")]
            raise ValueError(
                f"'{key}' is a Compose key swapctl does not support" if known else f"unknown key '{key}'"
            )
        required = item.get("required", True)
        if not isinstance(required, bool):
            raise ValueError(f"required: expected true or false, got {required!r}")
        return item["path"], required
    raise ValueError(f"expected a path or {{path: FILE, required: true|false}}, got {item!r}")


def env_files(document: Mapping[str, Any], base_dir: Path) -> list[EnvFile]:
    """Every model's env files, in order, relative to the config's folder."""
    found: list[EnvFile] = []
    models = document.get("models")
    for model_id, model in models.items() if isinstance(models, dict) else ():
        if not isinstance(model, dict) or model.get("env_file") is None:
            continue
        where = f"models.{model_id}.env_file"
        try:
            entries = env_file_entries(model["env_file"])
        except ValueError as error:
            raise ConfigError(where, str(error)) from None
        for index, (path, required) in enumerate(entries):
            spot = where if isinstance(model["env_file"], str) else f"{where}.{index}"
            found.append(EnvFile(str(model_id), spot, base_dir / Path(path).expanduser(), required))
    return found


def apply_env_files(
    composed: Composed, files: Sequence[EnvFile], texts: Mapping[Path, str]
) -> dict[str, Any]:
    """The document with each model's env files (`texts`, read by the caller) merged under its
    `environment`, later files over earlier ones, as Compose merges them."""
    if not files:
        return composed.document
    document = dict(composed.document)
    models = dict(document["models"])  # env_files found models, so it is a mapping
    for model_id in dict.fromkeys(entry.model for entry in files):
        values: dict[str, str] = {}
        for entry in (e for e in files if e.model == model_id):
            text = texts.get(entry.path)
            if text is None:
                if entry.required:
                    raise ConfigError(entry.where, f"no such file: {entry.path}")
                continue
            values.update(parse_env_file(text, composed.environ, f"{entry.where} ({entry.path})"))
        own = models[model_id].get("environment")
        merged = {**values, **own} if isinstance(own, dict) else values if own is None else own
        models[model_id] = {**models[model_id], "environment": merged}
    document["models"] = models
    return document
