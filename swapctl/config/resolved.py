"""The configuration as the rest of swapctl reads it: every name and fallback resolved once.

`parse_config` turns the file's shape (`ConfigFile`, which holds every default) into a
`Config` of `Model`s whose values are final: a model's `ttl` is its own or `globalTTL`, its
`health_check_timeout` its own or the global one, so no reader combines fallbacks. `Config`
and `Model` have no defaults of their own, and `load_config` is the only file I/O.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from swapctl.config.document import read_yaml
from swapctl.config.file import ConfigFile, GroupConfig, ModelConfig, parse_file
from swapctl.config.templates import load_template, template_name
from swapctl.errors import ConfigError, UnknownModelError
from swapctl.matrix import Group, GroupPolicy, MatrixPolicy, Policy, compile_program, matrix_names
from swapctl.names import Kind, Names

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# the names a request (or a hook, which starts models as requests do) and a person may use;
# computed once, as a request resolves its model on every call
REQUEST_NAMES = Kind.ID | Kind.ALIAS
PERSON_NAMES = Kind.VAR | Kind.ID | Kind.ALIAS


@dataclass(frozen=True)
class Model:
    """One model as swapctl runs it: its keys (Compose names), its template merged in."""

    image: str
    command: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    environment: Mapping[str, str]
    volumes: tuple[str, ...]
    shm_size: str | int | None
    working_dir: str | None
    user: str | None
    ipc: str | None
    devices: tuple[str, ...]
    labels: Mapping[str, str]
    stop_signal: str | None
    stop_grace_period: float  # seconds
    port: int
    health: str  # a path, or "none"
    gpus: Literal["all"] | int | tuple[str, ...] | None
    aliases: tuple[str, ...]
    use_model_name: str | None
    concurrency_limit: int
    ttl: int  # idle seconds before it stops, 0 never: its own ttl, else globalTTL
    health_check_timeout: int  # seconds: its own, else the global healthCheckTimeout


@dataclass(frozen=True)
class Config:
    """The parsed configuration, built only by `parse_config`."""

    models: Mapping[str, Model]
    names: Names
    policy: Policy
    preload: tuple[str, ...]  # model IDs
    instance: str
    listen: str
    max_request_bytes: int
    # the file's global values, for display: each model's own already holds what applies to it
    health_check_timeout: int
    global_ttl: int
    base_dir: Path
    api_keys: tuple[SecretStr, ...] = field(repr=False)  # SecretStr: masked even so
    cors: tuple[str, ...]
    allowed_hosts: tuple[str, ...]

    @property
    def aliases(self) -> Mapping[str, str]:
        return self.names.aliases

    @property
    def vars(self) -> Mapping[str, str]:
        return self.names.vars

    @functools.cached_property
    def longest_names(self) -> tuple[str, ...]:
        """Model IDs and aliases, longest first: where `/upstream/<model>/<path>` splits (an
        ID may hold '/'). Sorted once per config, not per request."""
        return tuple(sorted({*self.models, *self.aliases}, key=len, reverse=True))

    def resolve(self, name: str) -> str | None:
        """A model ID from a model ID or an alias (as API requests name models); else None."""
        try:
            return self.names.resolve(name, REQUEST_NAMES)
        except ConfigError:
            return None

    def resolve_any(self, name: str) -> str:
        """A model ID from a matrix var, a model ID or an alias (as a person types them)."""
        try:
            return self.names.resolve(name, PERSON_NAMES)
        except ConfigError:
            raise UnknownModelError(name, tuple(self.models)) from None


def _model(own: ModelConfig, shape: ConfigFile) -> Model:
    """A model's final values. Its own `ttl` wins even when it is 0 (never), so a model can
    be exempt from globalTTL; only an absent one takes it."""
    # every other key as written: Model and ModelConfig name the same keys, so a key added
    # to one and not the other fails every parse at once
    keys = own.model_dump(exclude={"template", "ttl", "health_check_timeout"})
    return Model(
        **keys,
        ttl=shape.global_ttl if own.ttl is None else own.ttl,
        health_check_timeout=(
            shape.health_check_timeout if own.health_check_timeout is None else own.health_check_timeout
        ),
    )


def _aliases(models: Mapping[str, ModelConfig]) -> dict[str, str]:
    aliases: dict[str, str] = {}
    for model_id, model in models.items():
        for alias in model.aliases:
            where = f"models.{model_id}.aliases"
            if alias in models:
                raise ConfigError(where, f"alias '{alias}' is also a model ID")
            if alias in aliases:
                raise ConfigError(where, f"duplicate alias '{alias}' (also an alias of '{aliases[alias]}')")
            aliases[alias] = model_id
    return aliases


def _api_keys(keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
    """The keys, each `${NAME}` read from the environment now; errors never show a key."""
    resolved = []
    for i, key in enumerate(keys):
        value = key.get_secret_value()
        reference = _ENV_REF.fullmatch(value)
        if reference:
            value = os.environ.get(reference[1], "")
            if not value:
                raise ConfigError(f"apiKeys.{i}", f"environment variable {reference[1]} is not set or empty")
        elif value.startswith("${"):
            raise ConfigError(f"apiKeys.{i}", "expected ${NAME}, NAME of letters, digits and '_'")
        if not re.fullmatch(r"[!-~]+", value):
            raise ConfigError(f"apiKeys.{i}", "a key must be printable ASCII with no spaces, and not empty")
        resolved.append(SecretStr(value))
    return tuple(resolved)


def _group_policy(groups: Mapping[str, GroupConfig], names: Names, models: tuple[str, ...]) -> GroupPolicy:
    owner: dict[str, str] = {}
    for name, group in groups.items():
        for member in group.members:
            where = f"groups.{name}.members"
            names.resolve(member, Kind.ID, where=where)
            if member in owner:
                raise ConfigError(where, f"model '{member}' is already a member of group '{owner[member]}'")
            owner[member] = name
    built = tuple(Group(n, g.members, g.swap, g.exclusive, g.persistent) for n, g in groups.items())
    return GroupPolicy(built, models)


def _policy(shape: ConfigFile, names: Names) -> tuple[Policy, Names]:
    """The matrix or the groups (one model at a time when neither), and the names with the
    matrix's vars."""
    models = tuple(shape.models)
    if shape.matrix is not None and shape.groups is not None:
        raise ConfigError("groups", "a config uses either 'matrix' or 'groups', not both")
    if shape.matrix is None:
        return _group_policy(shape.groups or {}, names, models), names
    matrix = shape.matrix
    names = matrix_names(matrix.vars, names)
    return MatrixPolicy(compile_program(names, models, matrix.evict_costs, matrix.sets)), names


def parse_config(
    raw: object,
    templates: Mapping[str, Mapping[str, Any]] | None = None,
    base_dir: Path = Path("."),
) -> Config:
    """Validate a mapping (as read from YAML) into a Config, or raise ConfigError."""
    shape = parse_file(raw, templates or {})
    policy, names = _policy(shape, Names(frozenset(shape.models), _aliases(shape.models)))
    preload = tuple(
        names.resolve(name, REQUEST_NAMES, where=f"hooks.on_startup.preload.{i}")
        for i, name in enumerate(shape.hooks.on_startup.preload)
    )
    return Config(
        models={model_id: _model(model, shape) for model_id, model in shape.models.items()},
        names=names,
        policy=policy,
        preload=preload,
        instance=shape.instance,
        listen=shape.listen,
        max_request_bytes=shape.max_request_bytes,
        health_check_timeout=shape.health_check_timeout,
        global_ttl=shape.global_ttl,
        base_dir=base_dir,
        api_keys=_api_keys(shape.api_keys),
        cors=shape.cors,
        allowed_hosts=shape.allowed_hosts,
    )


def load_config(path: Path) -> Config:
    """The Config in the file at `path`, with the templates its models name."""
    raw = read_yaml(path)
    base_dir = path.resolve().parent
    templates: dict[str, dict[str, Any]] = {}
    models = raw.get("models") if isinstance(raw, dict) else None
    for model_id, model in models.items() if isinstance(models, dict) else ():
        name = model.get("template") if isinstance(model, dict) else None
        if name is not None and template_name(model_id, name) not in templates:
            found = load_template(name, base_dir)
            if found:
                templates[name] = found
    return parse_config(raw, templates, base_dir)
