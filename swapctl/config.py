"""The configuration: one YAML file, parsed into frozen values, every error naming its key path.

`ConfigFile` is the file's shape (pydantic validates it and writes its JSON Schema);
`parse_config` adds what a schema cannot check (aliases, templates, the matrix or groups)
and returns a `Config` holding the compiled policy. `load_config` is the only file I/O.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from swapctl.errors import ConfigError, UnknownModelError
from swapctl.matrix import Group, GroupPolicy, MatrixPolicy, Policy, compile_matrix

TEMPLATE_DIR = "compose-templates"
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?")


def parse_duration(value: object) -> float:
    """Seconds from a number or a Compose duration such as `1m30s` or `500ms`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.fullmatch(value) if isinstance(value, str) and value else None
    if not match:
        raise ValueError(f"expected seconds or a duration such as '10s' or '1m30s', got {value!r}")
    hours, minutes, seconds, millis = (float(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


# The file accepts more forms than the parsed values hold; the schema describes the file.
_STRINGS = {"type": "array", "items": {"type": ["string", "number"]}}
_COMMAND = WithJsonSchema({"anyOf": [{"type": "string"}, _STRINGS, {"type": "null"}]})
_MAPPING = WithJsonSchema(
    {
        "anyOf": [
            {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean", "null"]}},
            _STRINGS,
        ]
    }
)
_DURATION_SCHEMA = WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"type": "string"}]})
_GPUS = WithJsonSchema(
    {"anyOf": [{"const": "all"}, {"type": "integer", "minimum": 1}, _STRINGS, {"type": "null"}]}
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelConfig(_Strict):
    """One model: a container definition (Compose keys) plus swapctl's own keys."""

    image: str = Field(
        description="Container image (Compose `image`); required unless a template supplies it."
    )
    template: str | None = Field(None, description=f"Name of a file in {TEMPLATE_DIR}/ to start from.")
    command: Annotated[tuple[str, ...] | None, _COMMAND] = Field(None, description="A string or a list.")
    entrypoint: Annotated[tuple[str, ...] | None, _COMMAND] = Field(None, description="A string or a list.")
    environment: Annotated[dict[str, str], _MAPPING] = Field(
        default_factory=dict, description="A mapping or a list of KEY=VALUE."
    )
    volumes: tuple[str, ...] = Field(
        (),
        description="Compose short syntax HOST:CONTAINER[:ro]; relative to the config file.",
    )
    shm_size: str | int | None = None
    working_dir: str | None = None
    user: str | None = None
    ipc: str | None = None
    devices: tuple[str, ...] = ()
    labels: Annotated[dict[str, str], _MAPPING] = Field(default_factory=dict)
    stop_signal: str | None = None
    stop_grace_period: Annotated[float, _DURATION_SCHEMA] = Field(
        10.0, description="Seconds (or '10s', '1m') between the stop signal and a kill."
    )
    port: int = Field(8080, ge=1, le=65535, description="Port the server listens on inside the container.")
    health: str = Field("/health", description="Path polled until HTTP 200, or `none`.")
    gpus: Annotated[Literal["all"] | int | tuple[str, ...] | None, _GPUS] = Field(
        None, description="`all`, a count, or a list of device IDs; absent means no GPU."
    )
    aliases: tuple[str, ...] = ()
    ttl: int = Field(0, ge=0, description="Stop after this many idle seconds; 0 never.")
    use_model_name: str | None = Field(None, alias="useModelName", description="Model name sent upstream.")
    health_check_timeout: int | None = Field(None, alias="healthCheckTimeout", ge=1)
    concurrency_limit: int = Field(10, alias="concurrencyLimit", ge=1)

    @field_validator("command", "entrypoint", mode="before")
    @classmethod
    def _split_command(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(shlex.split(value))
        if isinstance(value, list):
            return tuple(str(part) if isinstance(part, (int, float)) else part for part in value)
        return value

    @field_validator("environment", "labels", mode="before")
    @classmethod
    def _mapping_or_list(cls, value: object) -> object:
        if isinstance(value, list):
            pairs = [str(item).partition("=") for item in value]
            return {key: val for key, _, val in pairs}
        if isinstance(value, dict):
            return {
                k: "" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in value.items()
            }
        return value

    @field_validator("gpus", mode="before")
    @classmethod
    def _gpu_ids(cls, value: object) -> object:
        if isinstance(value, list):
            return tuple(str(device) for device in value)
        if (
            value is None
            or value == "all"
            or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        ):
            return value
        raise ValueError(f"expected 'all', a count of at least 1 or a list of device IDs, got {value!r}")

    @field_validator("stop_grace_period", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @field_validator("health")
    @classmethod
    def _health_path(cls, value: str) -> str:
        if value != "none" and not value.startswith("/"):
            raise ValueError(f"expected a path starting with '/' or 'none', got {value!r}")
        return value


class MatrixConfig(_Strict):
    vars: dict[str, str] = Field(default_factory=dict, description="Short names for model IDs.")
    evict_costs: dict[str, StrictInt] = Field(
        default_factory=dict, description="Cost of losing a running model (default 1)."
    )
    sets: dict[str, str] = Field(description="Named DSL expressions of models allowed to run together.")


class GroupConfig(_Strict):
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: tuple[str, ...]


class StartupHooks(_Strict):
    preload: tuple[str, ...] = Field((), description="Models started when `swapctl up` starts, in order.")


class Hooks(_Strict):
    on_startup: StartupHooks = Field(default_factory=StartupHooks)


class ConfigFile(_Strict):
    """The whole file."""

    models: dict[str, ModelConfig]
    matrix: MatrixConfig | None = None
    groups: dict[str, GroupConfig] | None = None
    instance: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Name of this swapctl instance; labels its containers.",
    )
    health_check_timeout: int = Field(120, alias="healthCheckTimeout", ge=1)
    global_ttl: int = Field(0, alias="globalTTL", ge=0)
    max_request_bytes: int = Field(
        100 * 2**20, alias="maxRequestBytes", ge=1, description="Largest request body accepted (413 beyond)."
    )
    hooks: Hooks = Field(default_factory=Hooks)
    listen: str = Field(
        "127.0.0.1:8080", pattern=r"^[^\s:]*:\d{1,5}$", description="HOST:PORT the proxy listens on."
    )


@dataclass(frozen=True)
class Config:
    models: Mapping[str, ModelConfig]
    aliases: Mapping[str, str]
    policy: Policy
    vars: Mapping[str, str] = field(default_factory=dict)
    instance: str = "default"
    health_check_timeout: int = 120
    global_ttl: int = 0
    listen: str = "127.0.0.1:8080"
    max_request_bytes: int = 100 * 2**20
    preload: tuple[str, ...] = ()
    base_dir: Path = Path(".")

    def resolve(self, name: str) -> str | None:
        """A model ID from a model ID or an alias (as API requests name models); else None."""
        if name in self.models:
            return name
        return self.aliases.get(name)

    def resolve_any(self, name: str) -> str:
        """A model ID from a matrix var, a model ID or an alias (as a person types them)."""
        found = self.vars.get(name) or self.resolve(name)
        if found is None:
            raise UnknownModelError(name, tuple(self.models))
        return found


def _translate(error: ValidationError) -> ConfigError:
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    path = ".".join(str(part) for part in first["loc"])
    kind, message = first["type"], first["msg"].removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if kind == "extra_forbidden":
        return ConfigError(path, f"unknown key '{first['loc'][-1]}'")
    if kind == "missing":
        return ConfigError(path, "required key is missing")
    return ConfigError(path, f"{message}, got {first['input']!r}" if "got" not in message else message)


def _apply_template(
    name: str, raw: Mapping[str, Any], templates: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    template = raw.get("template")
    if template is None:
        return dict(raw)
    if template not in templates:
        raise ConfigError(f"models.{name}.template", f"no template '{template}' in {TEMPLATE_DIR}/")
    merged = {**templates[template], **raw}
    for key in ("environment", "labels"):
        base, own = templates[template].get(key), raw.get(key)
        if isinstance(base, dict) and isinstance(own, dict):
            merged[key] = {**base, **own}
    return merged


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


def _group_policy(groups: Mapping[str, GroupConfig], models: Mapping[str, ModelConfig]) -> GroupPolicy:
    owner: dict[str, str] = {}
    for name, group in groups.items():
        for member in group.members:
            where = f"groups.{name}.members"
            if member not in models:
                raise ConfigError(where, f"unknown model '{member}'")
            if member in owner:
                raise ConfigError(where, f"model '{member}' is already a member of group '{owner[member]}'")
            owner[member] = name
    built = tuple(Group(n, g.members, g.swap, g.exclusive, g.persistent) for n, g in groups.items())
    return GroupPolicy(built, tuple(models))


def parse_config(
    raw: object,
    templates: Mapping[str, Mapping[str, Any]] | None = None,
    base_dir: Path = Path("."),
) -> Config:
    """Validate a mapping (as read from YAML) into a Config, or raise ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(
            "", f"the configuration must be a mapping with a 'models:' key, got {type(raw).__name__}"
        )
    raw_models = raw.get("models")
    if isinstance(raw_models, dict):
        for name, model in raw_models.items():
            if isinstance(model, dict):
                raw_models[name] = _apply_template(name, model, templates or {})
    try:
        shape = ConfigFile.model_validate(raw)
    except ValidationError as error:
        raise _translate(error) from None
    if not shape.models:
        raise ConfigError("models", "no models: define at least one")
    aliases = _aliases(shape.models)
    policy: Policy
    if shape.matrix is not None and shape.groups is not None:
        raise ConfigError("groups", "a config uses either 'matrix' or 'groups', not both")
    if shape.matrix is not None:
        m = shape.matrix
        program = compile_matrix(m.vars, m.evict_costs, m.sets, tuple(shape.models), aliases)
        policy = MatrixPolicy(program)
    else:
        policy = _group_policy(shape.groups or {}, shape.models)
    preload = []
    for i, name in enumerate(shape.hooks.on_startup.preload):
        model_id = name if name in shape.models else aliases.get(name)
        if model_id is None:
            raise ConfigError(f"hooks.on_startup.preload.{i}", f"unknown model '{name}'")
        preload.append(model_id)
    return Config(
        models=shape.models,
        aliases=aliases,
        policy=policy,
        vars=dict(shape.matrix.vars) if shape.matrix else {},
        instance=shape.instance,
        health_check_timeout=shape.health_check_timeout,
        global_ttl=shape.global_ttl,
        listen=shape.listen,
        max_request_bytes=shape.max_request_bytes,
        preload=tuple(preload),
        base_dir=base_dir,
    )


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping (YAML keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> Any:
    """The YAML document at `path`; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(path), f"cannot read: {error.strerror or error}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(str(path), f"invalid YAML: {where}{problem}") from None


def template_dirs(base_dir: Path) -> tuple[Path, ...]:
    bundled = Path(__file__).resolve().parent.parent / TEMPLATE_DIR
    return (base_dir / TEMPLATE_DIR, bundled)


def load_template(name: str, base_dir: Path) -> dict[str, Any]:
    """A template's single Compose service, its `x-swapctl` keys lifted to the top."""
    for folder in template_dirs(base_dir):
        path = folder / f"{name}.yaml"
        if path.is_file():
            document = read_yaml(path)
            services = document.get("services") if isinstance(document, dict) else None
            if not isinstance(services, dict) or len(services) != 1:
                raise ConfigError(str(path), "a template is a Compose file with exactly one service")
            service = dict(next(iter(services.values())))
            extra = service.pop("x-swapctl", None) or {}
            return {**service, **extra}
    return {}


def load_config(path: Path) -> Config:
    raw = read_yaml(path)
    base_dir = path.resolve().parent
    templates: dict[str, dict[str, Any]] = {}
    models = raw.get("models") if isinstance(raw, dict) else None
    for model in (models or {}).values() if isinstance(models, dict) else ():
        name = model.get("template") if isinstance(model, dict) else None
        if isinstance(name, str) and name not in templates:
            found = load_template(name, base_dir)
            if found:
                templates[name] = found
    return parse_config(raw, templates, base_dir)


def json_schema() -> dict[str, Any]:
    schema = ConfigFile.model_json_schema(by_alias=True)
    # a template may supply the image, so the file itself need not name one
    schema["$defs"]["ModelConfig"]["required"].remove("image")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "swapctl configuration"
    return schema
