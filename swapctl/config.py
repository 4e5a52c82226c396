"""The configuration: one YAML file, parsed into frozen values, every error naming its key path.

`ConfigFile` is the file's shape (pydantic validates it and writes its JSON Schema);
`parse_config` adds what a schema cannot check (aliases, templates, the matrix or groups)
and returns a `Config` holding the compiled policy. `load_config` is the only file I/O.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictInt,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from swapctl.errors import ConfigError, UnknownModelError
from swapctl.matrix import Group, GroupPolicy, MatrixPolicy, Policy, compile_matrix
from swapctl.matrix.program import MAX_COST

TEMPLATE_DIR = "compose-templates"
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")  # no '/', no '..'
_DURATION = re.compile(
    r"(?:([0-9]+(?:\.[0-9]+)?)h)?(?:([0-9]+(?:\.[0-9]+)?)m(?!s))?(?:([0-9]+(?:\.[0-9]+)?)s)?(?:([0-9]+)ms)?"
)
# Every number in the file is bounded: a value past these is a typo, and an unbounded one
# (`.inf`, `1e300`) would pass here and fail later, when a container is stopped or a timer set.
MAX_DURATION = 30 * 86400  # seconds: ttl, globalTTL
MAX_GRACE = 3600  # seconds between the stop signal and a kill
MAX_HEALTH_TIMEOUT = 86400
MAX_CONCURRENCY = 100_000
MAX_REQUEST_BYTES = 16 * 2**30
MAX_SHM_BYTES = 2**40
MAX_GPUS = 1024


def parse_duration(value: object, maximum: float = MAX_DURATION) -> float:
    """Seconds from a number or a Compose duration such as `1m30s` or `500ms`, finite and
    from 0 to `maximum` (NaN, infinities and huge numbers would overflow a timer later)."""
    amount: float
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        amount = value
    else:
        match = _DURATION.fullmatch(value) if isinstance(value, str) and value else None
        if not match:
            raise ValueError(f"expected seconds or a duration such as '10s' or '1m30s', got {value!r}")
        hours, minutes, seconds, millis = (float(part or 0) for part in match.groups())
        amount = hours * 3600 + minutes * 60 + seconds + millis / 1000
    if not 0 <= amount <= maximum:  # also false for NaN
        raise ValueError(f"expected a duration from 0 to {maximum:g} seconds, got {value!r}")
    return float(amount)


_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)(?:([bkmgBKMG])[bB]?)?")
_UNITS = {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}


def check_size(value: object, maximum: int = MAX_SHM_BYTES) -> str | int:
    """`value` unchanged when it is a byte count or a size Docker reads (`64m`, `1.5gb`) from
    0 to `maximum`; Docker itself would refuse it only when the container is created."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum:
        return value
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if isinstance(value, str) and match and float(match[1]) * _UNITS[(match[2] or "b").lower()] <= maximum:
        return value
    raise ValueError(
        f"expected a size in bytes, or such as '64m' or '1g', from 0 to {maximum}, got {value!r}"
    )


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


def _listen(text: str) -> str:
    parse_listen(text)
    return text


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
_GRACE_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            {"type": "number", "minimum": 0, "maximum": MAX_GRACE},
            {"type": "string", "minLength": 1, "pattern": f"^{_DURATION.pattern}$"},
        ]
    }
)
_COST = WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_COST})
_IPV4_PART = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_LISTEN = WithJsonSchema(
    {
        "type": "string",
        "pattern": (
            rf"^(?:(?:{_IPV4_PART}\.){{3}}{_IPV4_PART}"  # IPv4
            r"|\[[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?\]"  # [IPv6]
            rf"|(?:{_LABEL}\.)*(?=[A-Za-z0-9-]*[A-Za-z-]){_LABEL})?"  # a host name, its last label not all digits
            r":(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})$"
        ),
    }
)
_SHM_SIZE = WithJsonSchema(
    {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": MAX_SHM_BYTES},
            {"type": "string", "pattern": f"^{_SIZE.pattern}$"},
            {"type": "null"},
        ]
    }
)
_GPUS = WithJsonSchema(
    {
        "anyOf": [
            {"const": "all"},
            {"type": "integer", "minimum": 1, "maximum": MAX_GPUS},
            _STRINGS,
            {"type": "null"},
        ]
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class ModelConfig(_Strict):
    """One model: a container definition (Compose keys) plus swapctl's own keys."""

    image: str = Field(
        description="Container image (Compose `image`); required unless a template supplies it."
    )
    template: str | None = Field(
        None,
        max_length=64,
        pattern=f"^{TEMPLATE_NAME.pattern}$",
        description=f"Name of a file in {TEMPLATE_DIR}/ to start from (NAME for NAME.yaml).",
    )
    command: Annotated[tuple[str, ...] | None, _COMMAND] = Field(None, description="A string or a list.")
    entrypoint: Annotated[tuple[str, ...] | None, _COMMAND] = Field(None, description="A string or a list.")
    environment: Annotated[dict[str, str], _MAPPING] = Field(
        default_factory=dict, description="A mapping or a list of KEY=VALUE."
    )
    volumes: tuple[str, ...] = Field(
        (),
        description="Compose short syntax HOST:CONTAINER[:ro]; relative to the config file.",
    )
    shm_size: Annotated[str | int | None, _SHM_SIZE] = Field(
        None, description="Bytes, or a size such as '64m' or '1g' (at most 1 TiB)."
    )
    working_dir: str | None = None
    user: str | None = None
    ipc: str | None = None
    devices: tuple[str, ...] = ()
    labels: Annotated[dict[str, str], _MAPPING] = Field(default_factory=dict)
    stop_signal: str | None = None
    stop_grace_period: Annotated[float, _GRACE_SCHEMA] = Field(
        10.0, description="Seconds (or '10s', '1m') between the stop signal and a kill; at most 1h."
    )
    port: StrictInt = Field(
        8080, ge=1, le=65535, description="Port the server listens on inside the container."
    )
    health: str = Field("/health", description="Path polled until HTTP 200, or `none`.")
    gpus: Annotated[Literal["all"] | int | tuple[str, ...] | None, _GPUS] = Field(
        None, description="`all`, a count, or a list of device IDs; absent means no GPU."
    )
    aliases: tuple[str, ...] = ()
    ttl: StrictInt = Field(
        0, ge=0, le=MAX_DURATION, description="Stop after this many idle seconds; 0 never."
    )
    use_model_name: str | None = Field(None, alias="useModelName", description="Model name sent upstream.")
    health_check_timeout: StrictInt | None = Field(
        None, alias="healthCheckTimeout", ge=1, le=MAX_HEALTH_TIMEOUT
    )
    concurrency_limit: StrictInt = Field(10, alias="concurrencyLimit", ge=1, le=MAX_CONCURRENCY)

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
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_GPUS:
            raise ValueError(f"a GPU count is at most {MAX_GPUS}, got {value!r}")
        if (
            value is None
            or value == "all"
            or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
        ):
            return value
        raise ValueError(f"expected 'all', a count of at least 1 or a list of device IDs, got {value!r}")

    @field_validator("shm_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return value if value is None else check_size(value)

    @field_validator("stop_grace_period", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value, MAX_GRACE)

    @field_validator("health")
    @classmethod
    def _health_path(cls, value: str) -> str:
        if value != "none" and not value.startswith("/"):
            raise ValueError(f"expected a path starting with '/' or 'none', got {value!r}")
        return value


class MatrixConfig(_Strict):
    vars: dict[str, str] = Field(default_factory=dict, description="Short names for model IDs.")
    evict_costs: dict[str, Annotated[StrictInt, _COST]] = Field(
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


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")
_HOST_NAME = re.compile(r"\*|(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _origin(value: str) -> str:
    """An origin as browsers send it (no path, no trailing slash), or `*`; else it would never match."""
    value = value.lower()
    if value != "*" and not _ORIGIN.fullmatch(value):
        raise ValueError(
            f"expected '*' or an origin such as 'http://localhost:3000' (scheme://host[:port], no path), got {value!r}"
        )
    return value


def _host_name(value: str) -> str:
    value = value.lower()
    if not _HOST_NAME.fullmatch(value):
        raise ValueError(f"expected a host name (no scheme, no port), '*.example.com' or '*', got {value!r}")
    return value


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
    health_check_timeout: StrictInt = Field(120, alias="healthCheckTimeout", ge=1, le=MAX_HEALTH_TIMEOUT)
    global_ttl: StrictInt = Field(0, alias="globalTTL", ge=0, le=MAX_DURATION)
    max_request_bytes: StrictInt = Field(
        100 * 2**20,
        alias="maxRequestBytes",
        ge=1,
        le=MAX_REQUEST_BYTES,
        description="Largest request body accepted (413 beyond).",
    )
    hooks: Hooks = Field(default_factory=Hooks)
    listen: Annotated[str, AfterValidator(_listen), _LISTEN] = Field(
        "127.0.0.1:8080",
        description="HOST:PORT the proxy listens on: an IPv4 address, [IPv6], a host name, or empty for all.",
    )
    api_keys: tuple[SecretStr, ...] = Field(
        (),
        alias="apiKeys",
        description="Keys a client must send (`Authorization: Bearer KEY` or `x-api-key: KEY`) on every "
        "route but GET /health; `${NAME}` reads environment variable NAME at load. None: no key asked.",
    )
    cors: tuple[Annotated[str, AfterValidator(_origin)], ...] = Field(
        (),
        description="Origins (scheme://host[:port]) whose web pages may call the proxy and read its "
        "answers, or `*` for any. None: pages of other origins are refused.",
    )
    allowed_hosts: tuple[Annotated[str, AfterValidator(_host_name)], ...] = Field(
        (),
        alias="allowedHosts",
        description="Host names the proxy answers to besides the listen host, loopback names and IP "
        "addresses (a guard against DNS rebinding): `name`, `*.example.com`, or `*` for any.",
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
    api_keys: tuple[SecretStr, ...] = field(default=(), repr=False)  # SecretStr: masked even so
    cors: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()

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
    if first["loc"][:1] == ("apiKeys",):  # a key is never shown, not even a malformed one
        return ConfigError(path, message)
    return ConfigError(path, f"{message}, got {first['input']!r}" if "got" not in message else message)


def template_name(model_id: object, name: object) -> str:
    """`name` when it can only name a file in a templates folder: no path, no '..'."""
    if not isinstance(name, str) or len(name) > 64 or not TEMPLATE_NAME.fullmatch(name):
        raise ConfigError(
            f"models.{model_id}.template",
            f"a template name is letters, digits, '-', '_' and single dots (NAME for "
            f"{TEMPLATE_DIR}/NAME.yaml), got {name!r}",
        )
    return name


def _apply_template(
    name: str, raw: Mapping[str, Any], templates: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    template = raw.get("template")
    if template is None:
        return dict(raw)
    template = template_name(name, template)
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
        api_keys=_api_keys(shape.api_keys),
        cors=shape.cors,
        allowed_hosts=shape.allowed_hosts,
    )


# A config is a few levels deep; PyYAML's composer recurses once a level, and what reads
# the values (validation, repr) recurses too, so a deeper document is refused, not crashed on.
MAX_YAML_DEPTH = 100
# Aliases share one node however often they are used, but what is built from them is a tree:
# ten aliases of ten aliases... ("billion laughs") would build 10^9 values. This bounds the
# nodes that aliases add to what is written.
MAX_ALIAS_EXPANSION = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping (YAML keeps the last), and
    nesting past MAX_YAML_DEPTH while it composes (before the composer's recursion would)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.depth >= MAX_YAML_DEPTH:
            self.check_event()  # the node's first event becomes current_event
            mark = self.current_event.start_mark
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", mark
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping whose own keys are distinct; keys a merge (`<<: *base`) brings may be overridden."""
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, "found unhashable key", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _alias_problem(root: yaml.Node) -> str | None:
    """Why the composed document must not be built, or None: an alias inside what it names
    (an endless value), or aliases expanding it past MAX_ALIAS_EXPANSION nodes or
    MAX_YAML_DEPTH levels. One pass over the distinct nodes, memoised by identity."""
    size: dict[int, int] = {}  # id(node) -> nodes in its expansion
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # entered, children not finished: their ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            children = _children(node)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            open_nodes.discard(key)
        elif key in open_nodes:
            return "an alias refers to itself or to a node that contains it (an endless value)"
        elif key not in size:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    if size[id(root)] - len(size) > MAX_ALIAS_EXPANSION:
        return f"refused: its aliases would expand it by more than {MAX_ALIAS_EXPANSION} nodes"
    if depth[id(root)] > MAX_YAML_DEPTH:
        return f"nested more than {MAX_YAML_DEPTH} levels deep once its aliases are expanded"
    return None


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _build(text: str, path: Path) -> Any:
    """Compose the node graph, measure it, and only then build the values."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if problem := _alias_problem(node):
            raise ConfigError(str(path), problem)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Any:
    """The YAML document at `path`; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(path), f"cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            str(path), f"not UTF-8 text: byte {error.start + 1} is {error.object[error.start]:#x}"
        ) from None
    try:
        return _build(text, path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(str(path), f"invalid YAML: {where}{problem}") from None
    except ValueError as error:  # a scalar its tag cannot hold: `!!int x`, an int of 5000 digits
        raise ConfigError(str(path), f"invalid YAML: {error}") from None


def template_dirs(base_dir: Path) -> tuple[Path, ...]:
    bundled = Path(__file__).resolve().parent.parent / TEMPLATE_DIR
    return (base_dir / TEMPLATE_DIR, bundled)


def load_template(name: str, base_dir: Path) -> dict[str, Any]:
    """A template's single Compose service, its `x-swapctl` keys lifted to the top; empty
    when no templates folder has it. A file of another shape names itself and the key."""
    for folder in template_dirs(base_dir):
        path = folder / f"{name}.yaml"
        if path.is_file():
            document = read_yaml(path)
            if not isinstance(document, dict):
                raise ConfigError(
                    str(path), f"a template is a Compose file (a mapping), got {type(document).__name__}"
                )
            services = document.get("services")
            if not isinstance(services, dict) or len(services) != 1:
                raise ConfigError(str(path), "a template is a Compose file with exactly one service")
            [(service_name, service)] = services.items()
            if not isinstance(service, dict):
                raise ConfigError(
                    str(path),
                    f"services.{service_name}: a service is a mapping of Compose keys, "
                    f"got {type(service).__name__}",
                )
            service = dict(service)
            extra = service.pop("x-swapctl", None)
            if not isinstance(extra, dict | None):
                raise ConfigError(
                    str(path),
                    f"services.{service_name}.x-swapctl: must be a mapping of swapctl keys, "
                    f"got {type(extra).__name__}",
                )
            return {**service, **(extra or {})}
    return {}


def load_config(path: Path) -> Config:
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


def json_schema() -> dict[str, Any]:
    schema = ConfigFile.model_json_schema(by_alias=True)
    # a template may supply the image, so the file itself need not name one
    schema["$defs"]["ModelConfig"]["required"].remove("image")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "swapctl configuration"
    return schema
