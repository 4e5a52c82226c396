"""PURE (but for reading the file): a Compose file turned into a swapctl config, one model per service.

`from_compose` keeps what swapctl reads as Compose does (image, command, environment, volumes,
GPUs in the form they had, and every other key `ModelConfig` has), takes `port` from the
container side of the first `ports` mapping (else `expose`), and `health` from an HTTP
`healthcheck` (curl or wget against localhost). Everything else is dropped and named in a
comment above the model's keys. `${VAR}` references are kept as written: swapctl interpolates
the new file with Compose's rules, from the environment and the `.env` beside it. Relative
paths (volumes, env_file) are rewritten to mean the same files from the new file's folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from swapctl.config.compose import COMPOSE_SERVICE_KEYS
from swapctl.config.document import read_yaml
from swapctl.config.file import ModelConfig
from swapctl.errors import ConfigError

# The Compose keys swapctl reads, copied as they are (ports and healthcheck become port/health).
KEPT_KEYS = frozenset(
    key
    for key in (field.alias or name for name, field in ModelConfig.model_fields.items())
    if key in COMPOSE_SERVICE_KEYS
)
# The part of `deploy` swapctl reads; the rest is dropped.
_DEPLOY_KEPT: Mapping[str, Any] = {
    "resources": {"limits": {"cpus": None, "memory": None}, "reservations": {"devices": None}}
}
_HTTP_URL = re.compile(
    r"https?://(?:localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(?::(?P<port>[0-9]{1,5}))?(?P<path>/[^\s'\"|;&)]*)?"
)
_HTTP_CLIENT = re.compile(r"(?:^|[\s/'\"])(?:curl|wget)(?:\s|$)")
_PORT = re.compile(r"[0-9]{1,5}")
_DEFAULT_PORT = ModelConfig.model_fields["port"].default
_DEFAULT_HEALTH = ModelConfig.model_fields["health"].default


class _Dumper(yaml.SafeDumper):
    """Lists indented under their key, as people write Compose files."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def from_compose(path: Path, out_dir: Path | None = None) -> str:
    """The swapctl config (YAML text, with comments) for the Compose file at `path`, its
    relative paths relative to `out_dir` (default: the Compose file's folder)."""
    raw = read_yaml(path)
    services = raw.get("services") if isinstance(raw, dict) else None
    if not isinstance(services, dict) or not services:
        raise ConfigError(str(path), "not a Compose file: no services (expected a 'services:' mapping)")
    source_dir = path.resolve().parent
    target_dir = (out_dir or source_dir).resolve()
    project = _project_name(raw, source_dir)
    named = _named_volumes(raw.get("volumes"), project)
    blocks: list[str] = []
    for name, service in services.items():
        if not isinstance(service, dict):
            raise ConfigError(f"{path}: services.{name}", "expected a mapping (a Compose service)")
        model, notes = _model(str(name), service, project, named, source_dir, target_dir)
        blocks.append(_block(str(name), model, notes))
    ids = [str(name) for name in services]
    moved = target_dir != source_dir
    header = [
        f"# swapctl config from {path.name} (swapctl config from-compose): one model per service.",
        "# ${VAR} references are kept: swapctl reads them from the environment and the .env beside",
        "# this file" + (f" (copy {path.name}'s .env here if it has one)." if moved else "."),
        "# Relative paths (volumes, env_file) are relative to this file's folder.",
        "models:",
    ]
    footer = [
        "# Which models may run together (without a matrix, one model runs at a time):",
        f"# matrix: {{sets: {{all: {_quoted(' & '.join(ids))}}}}}",
    ]
    return "\n".join([*header, "\n\n".join(blocks), "", *footer]) + "\n"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _project_name(raw: Mapping[str, Any], folder: Path) -> str:
    """Compose's project name: `name:`, else the folder's name, lowercased, as Compose normalises it."""
    name = raw.get("name")
    text = name if isinstance(name, str) and name and "$" not in name else folder.name
    return re.sub(r"[^a-z0-9_-]", "", text.lower()).lstrip("_-") or "default"


def _named_volumes(volumes: object, project: str) -> dict[str, str]:
    """Each top-level named volume's Docker name, as Compose creates it (PROJECT_NAME unless
    `name:` or `external`)."""
    found: dict[str, str] = {}
    for key, options in volumes.items() if isinstance(volumes, dict) else ():
        given = options.get("name") if isinstance(options, dict) else None
        external = isinstance(options, dict) and options.get("external") is True
        found[str(key)] = str(given) if given else str(key) if external else f"{project}_{key}"
    return found


def _model(
    name: str,
    service: Mapping[str, Any],
    project: str,
    named: Mapping[str, str],
    source_dir: Path,
    target_dir: Path,
) -> tuple[dict[str, Any], list[str]]:
    """The model for one service, and the comment lines to put above its keys."""
    model: dict[str, Any] = {}
    notes: list[str] = []
    dropped: list[str] = []
    for key, value in service.items():
        key = str(key)
        if key.startswith("x-") or key in ("ports", "expose", "healthcheck"):
            continue
        if key not in KEPT_KEYS:
            dropped.append(key)
        elif key == "volumes":
            volumes = [_volume(entry, named, source_dir, target_dir) for entry in value or []]
            dropped.extend(f"volumes.{index}" for index, item in enumerate(volumes) if item is None)
            if any(item is not None for item in volumes):
                model[key] = [item for item in volumes if item is not None]
        elif key == "env_file":
            model[key] = _env_file(value, source_dir, target_dir)
        elif key == "deploy":
            kept = _pruned(value, _DEPLOY_KEPT, "deploy", dropped)
            if kept:
                model[key] = kept
        elif key == "network_mode" and (
            value in ("host", "none") or str(value).startswith(("container:", "service:"))
        ):
            dropped.append(f"network_mode: {value}")
        elif key == "pull_policy" and value == "build":
            dropped.append(f"pull_policy: {value}")
        else:
            model[key] = value
    if "image" not in model:
        model = {"image": f"{project}-{name}", **model}
        notes.append(
            f"Compose builds this image as {project}-{name}: build it first (docker compose build {name})"
        )
    port = _port(service.get("ports")) or _port(service.get("expose"))
    health = _health(service.get("healthcheck"))
    if health is not None:
        model["health"] = health[0]
        port = port or health[1]
    elif "healthcheck" in service:
        notes.append(
            f"its healthcheck was not an HTTP check: health stays {_DEFAULT_HEALTH}; set health (a path, or none)"
        )
    if port is None:
        notes.append(f"no port in ports, expose or healthcheck: port stays {_DEFAULT_PORT}; set port")
    else:
        model["port"] = port
    if dropped:
        notes.insert(0, f"dropped (swapctl does not support them): {', '.join(dropped)}")
    return model, notes


def _pruned(value: object, kept: Mapping[str, Any] | None, where: str, dropped: list[str]) -> object:
    """`value` with only the keys in `kept` (a tree; None keeps all below), the others named in `dropped`."""
    if kept is None or not isinstance(value, dict):
        return value
    result: dict[str, Any] = {}
    for key, item in value.items():
        if key not in kept:
            dropped.append(f"{where}.{key}")
            continue
        pruned = _pruned(item, kept[key], f"{where}.{key}", dropped)
        if pruned not in ({}, None):
            result[key] = pruned
    return result


def _rebased(path: str, source_dir: Path, target_dir: Path) -> str:
    """A relative path, meaning the same file from `target_dir` as it meant from `source_dir`."""
    if source_dir == target_dir or "$" in path or path.startswith(("/", "~")):
        return path
    rebased = os.path.relpath(source_dir / path, target_dir)
    return rebased if rebased.startswith(".") else f"./{rebased}"


def _volume(entry: object, named: Mapping[str, str], source_dir: Path, target_dir: Path) -> object:
    """A volume in swapctl's short form, HOST:CONTAINER[:ro]: relative host paths rebased, named
    volumes under the name Compose gave them, the long form turned into the short one; None
    for a long form with no short one (tmpfs, anonymous)."""
    if isinstance(entry, dict):
        source, target = entry.get("source"), entry.get("target")
        if not source or not target or entry.get("type", "volume") not in ("bind", "volume"):
            return None
        entry = f"{source}:{target}" + (":ro" if entry.get("read_only") else "")
    if not isinstance(entry, str):
        return entry
    host, sep, rest = entry.partition(":")
    if not sep:
        return entry
    if host.startswith("."):
        host = _rebased(host, source_dir, target_dir)
    elif host in named:
        host = named[host]
    return f"{host}{sep}{rest}"


def _env_file(value: object, source_dir: Path, target_dir: Path) -> object:
    if isinstance(value, str):
        return _rebased(value, source_dir, target_dir)
    if not isinstance(value, list):
        return value
    return [
        _rebased(item, source_dir, target_dir)
        if isinstance(item, str)
        else {**item, "path": _rebased(item["path"], source_dir, target_dir)}
        if isinstance(item, dict) and isinstance(item.get("path"), str)
        else item
        for item in value
    ]


def _split_colons(text: str) -> list[str]:
    """`text` split at each ':' outside `${...}` (`${PORT:-8000}` stays whole)."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if text.startswith("${", index):
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        elif char == ":" and not depth:
            parts.append(text[start:index])
            start = index + 1
    return [*parts, text[start:]]


def _port(value: object) -> int | str | None:
    """The container side of the first entry of `ports` or `expose`: `8000:8000`,
    `127.0.0.1:8000:8000/tcp`, `8000-8001`, 8000 or `{target: 8000}`; a `${VAR}` kept."""
    if not isinstance(value, list) or not value:
        return None
    first = value[0]
    if isinstance(first, dict):
        first = first.get("target")
    if isinstance(first, int) and not isinstance(first, bool):
        return first
    if not isinstance(first, str):
        return None
    container = _split_colons(first)[-1].strip()
    if "$" in container:  # a variable: swapctl interpolates it, and reads a number from it
        return container if re.fullmatch(r"\$\{[^{}]*\}|\$[A-Za-z_][A-Za-z0-9_]*", container) else None
    container = container.partition("/")[0].partition("-")[0]
    return int(container) if _PORT.fullmatch(container) else None


def _health(check: object) -> tuple[str, int | None] | None:
    """(path, port) of an HTTP healthcheck: curl or wget against http://localhost[:PORT]/PATH."""
    if not isinstance(check, dict) or check.get("disable") is True:
        return None
    test = check.get("test")
    if isinstance(test, list):
        if not test or test[0] == "NONE":
            return None
        test = " ".join(str(part) for part in (test[1:] if test[0] in ("CMD", "CMD-SHELL") else test))
    if not isinstance(test, str) or not _HTTP_CLIENT.search(test):
        return None
    found = _HTTP_URL.search(test)
    if found is None:
        return None
    port = found["port"]
    return found["path"] or "/", int(port) if port else None


def _block(name: str, model: Mapping[str, Any], notes: list[str]) -> str:
    """The model as YAML under `models:`, its notes as comments above its keys."""
    text = yaml.dump({name: dict(model)}, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    first, _, rest = text.partition("\n")
    comments = "".join(f"    # {note}\n" for note in notes)
    body = "".join(f"  {line}\n" for line in rest.splitlines())
    return f"  {first}\n{comments}{body}".rstrip("\n")
