"""The file's shape: pydantic validates it, writes its JSON Schema, and holds every default.

The classes here describe the file as written (a model's `ttl` may be absent); the values
the rest of swapctl reads, every fallback applied, are built from them in `resolved.py`.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    SecretStr,
    StrictBool,
    StrictInt,
    Tag,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from swapctl.config.compose import env_file_entries, unsupported_key
from swapctl.config.filters import PROTECTED as PROTECTED_PARAMS
from swapctl.config.hosts import DEFAULT_TIMEOUT, LOCAL_NAME, check_address, check_docker
from swapctl.config.metadata import json_metadata
from swapctl.config.scalars import (
    DEFAULT_GRACE,
    DURATION,
    GPU_MEMORY,
    MAX_CONCURRENCY,
    MAX_CPUS,
    MAX_DURATION,
    MAX_GPU_MEMORY,
    MAX_GPUS,
    MAX_GRACE,
    MAX_HEALTH_TIMEOUT,
    MAX_MEMORY,
    MAX_REQUEST_BYTES,
    MAX_SHM_BYTES,
    MIN_MEMORY,
    SIZE,
    check_size,
    parse_cpus,
    parse_duration,
    parse_gpu_memory,
    parse_listen,
    parse_size,
)
from swapctl.config.service import (
    PULL_POLICIES,
    ULIMIT_NAMES,
    Network,
    Ulimit,
    parse_capabilities,
    parse_extra_hosts,
    parse_names,
    parse_network,
    parse_network_mode,
    parse_networks,
    parse_pull_policy,
    parse_tmpfs,
    parse_ulimits,
)
from swapctl.config.templates import TEMPLATE_DIR, TEMPLATE_NAME
from swapctl.errors import ConfigError
from swapctl.matrix.program import AUTO, MAX_COST, EvictCosts


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
            {"type": "string", "minLength": 1, "pattern": f"^{DURATION.pattern}$"},
        ]
    }
)
_COST = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_COST}, {"const": AUTO}]}


def _evict_costs(value: object) -> EvictCosts:
    """`auto`, or a map of names to costs; each cost is checked, under its own key path, as
    the matrix compiles (`compile_cost_rules`)."""
    if value == AUTO:
        return AUTO
    if isinstance(value, dict) and all(isinstance(name, str) for name in value):
        return value
    raise ValueError("expected 'auto' or a map of models to costs (positive integers or 'auto')")


EvictCostsKey = Annotated[
    EvictCosts,
    PlainValidator(_evict_costs),
    WithJsonSchema({"anyOf": [{"const": AUTO}, {"type": "object", "additionalProperties": _COST}]}),
]
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
            {"type": "string", "pattern": f"^{SIZE.pattern}$"},
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


def _read_by(parse: Callable[[object], object]) -> PlainValidator:
    """A key read by `parse` (whose ValueError is the key's error); null stays null."""
    return PlainValidator(lambda value: None if value is None else parse(value))


_NAMES = {"type": "array", "items": {"type": "string"}}
_NAMES_OR_MAPPING = {"anyOf": [_NAMES, {"type": "object"}]}
_LIMIT = {"type": ["integer", "string"]}
_ULIMITS = {
    "type": "object",
    "propertyNames": {"enum": sorted(ULIMIT_NAMES)},
    "additionalProperties": {
        "anyOf": [
            _LIMIT,
            {
                "type": "object",
                "properties": {"soft": _LIMIT, "hard": _LIMIT},
                "required": ["soft", "hard"],
                "additionalProperties": False,
            },
        ]
    },
}
_ENV_FILE_ENTRY = {
    "type": "object",
    "properties": {"path": {"type": "string"}, "required": {"type": "boolean"}},
    "required": ["path"],
    "additionalProperties": False,
}
_SECURITY_OPTION = re.compile(r"[a-z-]+(?:[=:].+)?")
Cpus = Annotated[
    float | None,
    _read_by(parse_cpus),
    WithJsonSchema(
        {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": MAX_CPUS}, {"type": "string"}]}
    ),
]
Memory = Annotated[
    int | None,
    _read_by(lambda value: parse_size(value, MIN_MEMORY, MAX_MEMORY)),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": MIN_MEMORY, "maximum": MAX_MEMORY},
                {"type": "string", "pattern": f"^{SIZE.pattern}$"},
            ]
        }
    ),
]
GpuMemory = Annotated[
    int,
    _read_by(parse_gpu_memory),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1, "maximum": MAX_GPU_MEMORY},
                {"type": "string", "pattern": f"^{GPU_MEMORY.pattern}$"},
            ]
        }
    ),
]
EnvFiles = Annotated[
    tuple[str, ...],
    _read_by(lambda value: tuple(path for path, _ in env_file_entries(value))),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"anyOf": [{"type": "string"}, _ENV_FILE_ENTRY]}},
            ]
        }
    ),
]
Ulimits = Annotated[tuple[Ulimit, ...], _read_by(parse_ulimits), WithJsonSchema(_ULIMITS)]
Groups = Annotated[
    tuple[str, ...],
    _read_by(lambda value: parse_names(value, "group names or IDs")),
    WithJsonSchema({"type": "array", "items": {"type": ["string", "integer"]}}),
]
SecurityOptions = Annotated[
    tuple[str, ...],
    _read_by(lambda value: parse_names(value, "options such as seccomp=unconfined", _SECURITY_OPTION)),
    WithJsonSchema(_NAMES),
]
Capabilities = Annotated[tuple[str, ...], _read_by(parse_capabilities), WithJsonSchema(_NAMES)]
Tmpfs = Annotated[
    tuple[str, ...], _read_by(parse_tmpfs), WithJsonSchema({"anyOf": [{"type": "string"}, _NAMES]})
]
ExtraHosts = Annotated[tuple[str, ...], _read_by(parse_extra_hosts), WithJsonSchema(_NAMES_OR_MAPPING)]
NetworkMode = Annotated[
    str | None,
    _read_by(parse_network_mode),
    WithJsonSchema({"type": "string", "not": {"enum": ["host", "none"]}}),
]
Networks = Annotated[tuple[Network, ...], _read_by(parse_networks), WithJsonSchema(_NAMES_OR_MAPPING)]
PullPolicy = Annotated[str, _read_by(parse_pull_policy), WithJsonSchema({"enum": list(PULL_POLICIES)})]


def _conflict(message: str) -> PydanticCustomError:
    """Two keys that disagree: the error names them, not the whole model as its input."""
    return PydanticCustomError("conflict", message)


def _count_or_all(value: object) -> object:
    """Compose's device count: `all` (-1, as compose-go reads it) or a number, maybe a string."""
    if value == "all":
        return -1
    return int(value) if isinstance(value, str) and value.isdigit() else value


def _device_ids(value: object) -> object:
    return tuple(str(device) for device in value) if isinstance(value, list) else value


class DeviceReservation(_Strict):
    """Compose's GPU form, `deploy.resources.reservations.devices[]`: the same device request as
    `gpus:` (https://docs.docker.com/compose/how-tos/gpu-support/)."""

    capabilities: tuple[str, ...] = Field(min_length=1, description="Such as [gpu].")
    driver: str = Field("", description="Such as nvidia; empty: Docker's choice.")
    count: Annotated[
        int | None,
        BeforeValidator(_count_or_all),
        WithJsonSchema(
            {
                "anyOf": [
                    {"const": "all"},
                    {"type": "integer", "minimum": 1, "maximum": MAX_GPUS},
                    {"type": "string"},
                ]
            }
        ),
    ] = Field(None, description="A number of devices or `all`; absent (and no device_ids): all.")
    device_ids: Annotated[
        tuple[str, ...],
        BeforeValidator(_device_ids),
        WithJsonSchema({"type": "array", "items": {"type": ["string", "integer"]}}),
    ] = ()
    options: dict[str, str] = Field(default_factory=dict)

    @field_validator("count")
    @classmethod
    def _count(cls, value: int | None) -> int | None:
        if value is not None and not (value == -1 or 1 <= value <= MAX_GPUS):
            raise ValueError(f"expected `all` or a count from 1 to {MAX_GPUS}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_way(self) -> DeviceReservation:
        if self.count is not None and self.device_ids:
            raise _conflict("'count' and 'device_ids' cannot be used together")
        return self


class ResourceLimits(_Strict):
    cpus: Cpus = None
    memory: Memory = None


class ResourceReservations(_Strict):
    devices: tuple[DeviceReservation, ...] = ()


class Resources(_Strict):
    limits: ResourceLimits = Field(default_factory=ResourceLimits)
    reservations: ResourceReservations = Field(default_factory=ResourceReservations)


class Deploy(_Strict):
    """The part of Compose's `deploy` a single container has: `resources`."""

    resources: Resources = Field(default_factory=Resources)


def _comma_list(value: object) -> object:
    """`stripParams`: llama-swap's comma list, or a YAML list."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _no_protected(keys: object) -> object:
    for key in keys if isinstance(keys, (tuple, dict)) else ():
        if str(key).removesuffix("?") in PROTECTED_PARAMS:
            raise ValueError(f"'{key}' is swapctl's own (it routes the request); a filter never changes it")
    return keys


_PARAMS = Annotated[dict[str, Any], AfterValidator(_no_protected)]


class PeerFiltersConfig(_Strict):
    """What is changed in a JSON request body before it is forwarded (llama-swap's filters);
    a peer's have these two, as its IDs are its own."""

    strip_params: Annotated[
        tuple[str, ...],
        BeforeValidator(_comma_list),
        AfterValidator(_no_protected),
        WithJsonSchema({"anyOf": [{"type": "string"}, _NAMES]}),
    ] = Field(
        (),
        alias="stripParams",
        description="JSON keys removed from requests: 'temperature, top_p' or a list; a dotted key "
        "(a.b) reaches into an object.",
    )
    set_params: _PARAMS = Field(
        default_factory=dict,
        alias="setParams",
        description="Values set in every request; a key ending in '?' only fills a value the request "
        "left out; a dotted key (a.b) reaches into an object.",
    )


class FiltersConfig(PeerFiltersConfig):
    """A model's filters: a peer's, and more IDs for the model, each with its own values."""

    set_params_by_id: dict[str, _PARAMS] = Field(
        default_factory=dict,
        alias="setParamsByID",
        description="More model IDs served by this model, each with values set after setParams; "
        "each ID is listed in /v1/models and routable like an alias.",
    )


def _timeout_schema(*extra: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": MAX_DURATION},
                {"type": "string", "minLength": 1, "pattern": f"^{DURATION.pattern}$"},
                *extra,
            ]
        }
    )


# a limit on a model's server: seconds or a duration ('90s', '10m'), 0 for none; a model's
# own may be null (absent: the global one)
Timeout = Annotated[float, PlainValidator(parse_duration), _timeout_schema()]
OwnTimeout = Annotated[float | None, _read_by(parse_duration), _timeout_schema({"type": "null"})]
_CONNECT = "Opening a connection to the model's server"
_RESPONSE_HEADER = (
    "From sending a request to the head of its answer (past it: 504). A non-streamed answer's head "
    "comes only once it is generated whole"
)
_IDLE = "Between two chunks of an answer's body (past it: a stream ends with an error event)"


class TimeoutsConfig(_Strict):
    """How long forwarding waits on a model's server (llama-swap's `timeouts`): seconds or a
    duration ('90s', '10m'), 0 for no limit. A model's own `timeouts` win, key by key."""

    connect: Timeout = Field(10.0, description=f"{_CONNECT}. Default: 10s.")
    response_header: Timeout = Field(
        0.0, alias="responseHeader", description=f"{_RESPONSE_HEADER}. Default: 0, no limit."
    )
    idle: Timeout = Field(600.0, description=f"{_IDLE}. Default: 600s.")


class ModelTimeoutsConfig(_Strict):
    """A model's own limits, key by key over the global `timeouts`."""

    connect: OwnTimeout = Field(None, description=f"{_CONNECT}; absent: the global one.")
    response_header: OwnTimeout = Field(
        None, alias="responseHeader", description=f"{_RESPONSE_HEADER}; absent: the global one."
    )
    idle: OwnTimeout = Field(None, description=f"{_IDLE}; absent: the global one.")


class _Routed(_Strict):
    """What every model has, wherever it is served: its names, how it is listed, and how
    requests for it are forwarded."""

    aliases: tuple[str, ...] = ()
    # how GET /v1/models shows it; none of them changes its container
    name: str | None = Field(None, max_length=256, description="A display name, in GET /v1/models.")
    description: str | None = Field(
        None, max_length=4096, description="What the model is for, in GET /v1/models."
    )
    metadata: Annotated[dict[str, Any], WithJsonSchema({"type": "object"})] = Field(
        default_factory=dict,
        description="Any values, returned as written under `meta.llamaswap` in GET /v1/models (dates as "
        "ISO 8601 strings).",
    )
    unlisted: StrictBool = Field(
        False,
        description="Left out of GET /v1/models (and its aliases and variants); requests still reach it.",
    )
    filters: FiltersConfig = Field(
        default_factory=FiltersConfig, description="Changes to JSON request bodies before they are forwarded."
    )
    use_model_name: str | None = Field(None, alias="useModelName", description="Model name sent upstream.")
    concurrency_limit: StrictInt = Field(10, alias="concurrencyLimit", ge=1, le=MAX_CONCURRENCY)
    timeouts: ModelTimeoutsConfig = Field(
        default_factory=ModelTimeoutsConfig,
        description="Limits on waiting for this model's server, key by key over the global `timeouts`.",
    )


class ModelConfig(_Routed):
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
        DEFAULT_GRACE, description="Seconds (or '10s', '1m') between the stop signal and a kill; at most 1h."
    )
    port: StrictInt = Field(
        8080, ge=1, le=65535, description="Port the server listens on inside the container."
    )
    health: str = Field("/health", description="Path polled until HTTP 200, or `none`.")
    gpus: Annotated[Literal["all"] | int | tuple[str, ...] | None, _GPUS] = Field(
        None, description="`all`, a count, or a list of device IDs; absent means no GPU."
    )
    # Compose keys for a model server's container (parsed in service.py), all in the spec hash
    env_file: EnvFiles = Field(
        (), description="KEY=VALUE files merged under `environment` at load; relative to the config file."
    )
    ulimits: Ulimits = Field(
        (), description="{nofile: {soft: N, hard: N}} or {memlock: -1}; -1 is unlimited."
    )
    runtime: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="A Docker runtime, such as nvidia."
    )
    group_add: Groups = ()
    security_opt: SecurityOptions = ()
    cap_add: Capabilities = ()
    cap_drop: Capabilities = ()
    tmpfs: Tmpfs = Field((), description="/path[:options], or a list of them.")
    mem_limit: Memory = Field(None, description="Bytes, or a size such as '16g'.")
    cpus: Cpus = Field(None, description="How many CPUs the container may use, such as 1.5.")
    deploy: Deploy | None = Field(
        None, description="Only `resources`: limits (cpus, memory) and reservations.devices (GPUs)."
    )
    extra_hosts: ExtraHosts = Field((), description="['name:IP'] or {name: IP}; IP may be host-gateway.")
    network_mode: NetworkMode = Field(None, description="bridge, default or a network of yours; never host.")
    networks: Networks = Field(
        (),
        description="Networks of yours to join ([name] or {name: {aliases: [...]}}); the port is still "
        "published on 127.0.0.1.",
    )
    pull_policy: PullPolicy = Field(
        "missing",
        description="missing (the default): pull the image when absent; always: pull before every "
        "start; never: an absent image is an error. Credentials come from your Docker config.",
    )
    vram: GpuMemory | None = Field(
        None,
        description="GPU memory the model holds on each GPU it uses, such as '18GiB'; `swapctl validate` "
        "checks the matrix's sets against `hardware`. Absent: unknown, not checked.",
    )
    hosts: tuple[str, ...] | None = Field(
        None,
        description="The hosts (names under `hosts:`, and `local` for this machine) it may run on, in the "
        "order preferred when nothing else decides; absent: local.",
    )
    sleep: Literal[1, 2] | None = Field(
        None,
        description="vLLM's sleep level: evicting the model puts it to sleep (POST /sleep?level=N), freeing "
        "its GPU memory, instead of stopping it; a request wakes it (POST /wake_up). Needs vLLM's "
        "--enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (see the vllm template).",
    )
    ttl: StrictInt | None = Field(
        None,
        ge=0,
        le=MAX_DURATION,
        description="Stop after this many idle seconds; 0 never, even with globalTTL; absent: globalTTL.",
    )
    health_check_timeout: StrictInt | None = Field(
        None,
        alias="healthCheckTimeout",
        ge=1,
        le=MAX_HEALTH_TIMEOUT,
        description="Seconds this model may take to answer its health check; absent: the global one.",
    )
    send_loading_state: StrictBool | None = Field(
        None,
        alias="sendLoadingState",
        description="While it starts, tell streamed chat requests how it goes; absent: the global one.",
    )

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

    @model_validator(mode="after")
    def _one_value_each(self) -> ModelConfig:
        """A setting written twice must say one thing (Compose refuses distinct values too)."""
        limits = self.deploy.resources.limits if self.deploy else ResourceLimits()
        if None not in (self.cpus, limits.cpus) and self.cpus != limits.cpus:
            raise _conflict("'cpus' and 'deploy.resources.limits.cpus' differ: keep one")
        if None not in (self.mem_limit, limits.memory) and self.mem_limit != limits.memory:
            raise _conflict("'mem_limit' and 'deploy.resources.limits.memory' differ: keep one")
        if self.gpus is not None and self.deploy and self.deploy.resources.reservations.devices:
            raise _conflict("'gpus' and 'deploy.resources.reservations.devices' both ask for GPUs: keep one")
        if self.network_mode is not None and self.networks:
            raise _conflict("'network_mode' and 'networks' cannot be used together")
        return self


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL of a server, got {text!r}")
    return text.rstrip("/")


HttpUrl = Annotated[str, AfterValidator(_http_url), WithJsonSchema({"type": "string", "format": "uri"})]


class ProxyModelConfig(_Routed):
    """A model served elsewhere by an OpenAI-compatible server that already runs: routed like
    any model, never started or stopped, outside the matrix."""

    proxy: HttpUrl = Field(
        description="The server's URL (http(s)://host:port[/prefix]); requests go to it with their own "
        "path: /v1/chat/completions -> URL/v1/chat/completions. Instead of an image."
    )
    api_key: SecretStr | None = Field(
        None,
        alias="apiKey",
        description="Sent as `Authorization: Bearer KEY` to the server (the client's key is swapctl's and "
        "never sent on); `${NAME}` reads it from the environment.",
    )


def _model_kind(value: object) -> str:
    """A model with `proxy` is served elsewhere; any other is a container."""
    found = (isinstance(value, dict) and "proxy" in value) or isinstance(value, ProxyModelConfig)
    return PROXY_TAG if found else CONTAINER_TAG


PROXY_TAG, CONTAINER_TAG = "proxy model", "container model"  # dropped from error paths
AnyModel = Annotated[
    Annotated[ModelConfig, Tag(CONTAINER_TAG)] | Annotated[ProxyModelConfig, Tag(PROXY_TAG)],
    Discriminator(_model_kind),
]


class PeerTimeoutsConfig(_Strict):
    """How long forwarding waits on a peer: its own cold starts included."""

    connect: Timeout = Field(10.0, description=f"{_CONNECT}. Default: 10s.")
    response_header: Timeout = Field(
        0.0,
        alias="responseHeader",
        description=f"{_RESPONSE_HEADER}. Default: 0, no limit: the peer may start the model first "
        "(llama-swap's 60s would cut a cold start).",
    )


def _peer_models(value: object) -> tuple[str, ...] | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, list) and all(isinstance(name, str) and name for name in value):
        return tuple(value)
    raise ValueError("expected `auto` or a list of the model IDs the peer serves")


class PeerConfig(_Strict):
    """Another swapctl (or llama-swap, or any OpenAI-compatible server) whose models this one
    routes to; llama-swap's keys."""

    proxy: HttpUrl = Field(description="The peer's URL, such as http://gpu2.lan:8080.")
    api_key: SecretStr | None = Field(
        None,
        alias="apiKey",
        description="Sent as `Authorization: Bearer KEY` to the peer; `${NAME}` reads it.",
    )
    models: Annotated[
        tuple[str, ...] | Literal["auto"],
        PlainValidator(_peer_models),
        WithJsonSchema({"anyOf": [{"const": "auto"}, _NAMES]}),
    ] = Field(
        "auto",
        description="The model IDs the peer serves, or `auto` (the default): read from its GET /v1/models "
        "and followed as it changes.",
    )
    timeouts: PeerTimeoutsConfig = Field(default_factory=PeerTimeoutsConfig)
    filters: PeerFiltersConfig = Field(
        default_factory=PeerFiltersConfig,
        description="Changes to JSON request bodies sent to this peer (stripParams, setParams).",
    )


class MatrixConfig(_Strict):
    vars: dict[str, str] = Field(default_factory=dict, description="Short names for model IDs.")
    evict_costs: EvictCostsKey = Field(
        default_factory=dict,
        description="Cost of losing a running model (default 1), or `auto`: the median of its measured "
        "starts (wakes, with `sleep`) in seconds. `auto` alone: every model.",
    )
    sets: dict[str, str] | None = Field(
        None, description="Named DSL expressions of models allowed to run together; required unless `fit`."
    )
    fit: Literal["gpu"] | None = Field(
        None,
        description="`gpu`: no sets; any models whose `vram` fits the declared `hardware` GPUs run together, "
        "and a request evicts the running models that cost least to free enough memory.",
    )


class GroupConfig(_Strict):
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False
    members: tuple[str, ...]


class GpuConfig(_Strict):
    memory: GpuMemory = Field(description="Its memory: bytes, or a size such as '24GiB', '24G', '24000MiB'.")


class HardwareConfig(_Strict):
    gpus: tuple[GpuConfig, ...] = Field(
        (),
        max_length=MAX_GPUS,
        description="The GPUs, in device index order (0 first), as `gpus:` device IDs number them.",
    )


class StartupHooks(_Strict):
    preload: tuple[str, ...] = Field((), description="Models started when `swapctl up` starts, in order.")


class HostTlsConfig(_Strict):
    """As `docker --tlsverify --tlscacert --tlscert --tlskey`: paths relative to this file."""

    ca: str | None = Field(None, description="The CA that signed the engine's certificate (PEM).")
    cert: str | None = Field(
        None, description="This side's client certificate (PEM), signed by a CA the engine trusts."
    )
    key: str | None = Field(None, description="The client certificate's key (PEM).")
    verify: StrictBool = Field(True, description="Check the engine's certificate against `ca`.")


class HostConfig(_Strict):
    """Another machine's Docker engine: how to reach it, and what may run together there (its
    own matrix, its GPUs). The models that name it in their `hosts` run there."""

    docker: Annotated[str, AfterValidator(check_docker)] = Field(
        description="The engine: tcp://HOST:PORT (with `tls`), ssh://[USER@]HOST[:PORT] (the user's "
        "~/.ssh config and known_hosts), unix:///PATH, or a Docker context's name."
    )
    tls: HostTlsConfig | None = Field(None, description="Mutual TLS for a tcp:// engine.")
    address: Annotated[str | None, AfterValidator(check_address)] = Field(
        None,
        description="The IP its containers publish their port on, where swapctl reaches them; absent: "
        "the docker URL's host, when it is an IP.",
    )
    timeout: float = Field(
        DEFAULT_TIMEOUT, gt=0, le=3600, description="Seconds a call to the engine may wait for its answer."
    )
    matrix: MatrixConfig | None = Field(
        None, description="Which of its models may run together there; absent: one at a time."
    )
    hardware: HardwareConfig | None = Field(None, description="Its GPUs, declared, as the top-level key.")


class Hooks(_Strict):
    on_startup: StartupHooks = Field(default_factory=StartupHooks)


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")
_HOST_NAME = re.compile(r"\*|(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?")


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
    """The whole file, every default of every key written here and nowhere else."""

    models: dict[str, AnyModel]
    peers: dict[str, PeerConfig] = Field(
        default_factory=dict, description="Other boxes whose models this one routes to, by name."
    )
    matrix: MatrixConfig | None = None
    groups: dict[str, GroupConfig] | None = None
    instance: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Name of this swapctl instance; labels its containers.",
    )
    health_check_timeout: StrictInt = Field(
        120,
        alias="healthCheckTimeout",
        ge=1,
        le=MAX_HEALTH_TIMEOUT,
        description="Seconds a model may take to answer its health check, unless it says otherwise.",
    )
    global_ttl: StrictInt = Field(
        0,
        alias="globalTTL",
        ge=0,
        le=MAX_DURATION,
        description="Stop a model idle this many seconds, unless it has a ttl of its own; 0 never.",
    )
    max_request_bytes: StrictInt = Field(
        100 * 2**20,
        alias="maxRequestBytes",
        ge=1,
        le=MAX_REQUEST_BYTES,
        description="Largest request body accepted (413 beyond).",
    )
    request_record: StrictInt = Field(
        1000,
        alias="requestRecord",
        ge=0,
        le=1_000_000,
        description="The last requests kept on record (GET /requests, the `request` events); 0 keeps none "
        "(and no request can be cancelled).",
    )
    capture_buffer: StrictInt = Field(
        0,
        alias="captureBuffer",
        ge=0,
        le=65536,
        description="MB of memory for the captured bodies of the requests on record (oldest dropped); "
        "0 captures none.",
    )
    send_loading_state: StrictBool = Field(
        False,
        alias="sendLoadingState",
        description="While a model starts, streamed chat completions get its progress as "
        "`reasoning_content` deltas (other streams get SSE comments), unless the model says otherwise.",
    )
    include_aliases_in_list: StrictBool = Field(
        False,
        alias="includeAliasesInList",
        description="GET /v1/models lists each alias too, as an entry of its own (its model's name, "
        "description and status).",
    )

    @model_validator(mode="before")
    @classmethod
    def _metadata_as_json(cls, document: object) -> object:
        """Each model's `metadata` as JSON values, an error naming the key path below it (a
        field's validator knows no model ID)."""
        models = document.get("models") if isinstance(document, dict) else None
        if not isinstance(models, dict) or not isinstance(document, dict):
            return document
        made = {
            model_id: {**model, "metadata": json_metadata(model["metadata"], f"models.{model_id}.metadata")}
            for model_id, model in models.items()
            if isinstance(model, dict) and model.get("metadata") is not None
        }
        return {**document, "models": {**models, **made}} if made else document

    timeouts: TimeoutsConfig = Field(
        default_factory=TimeoutsConfig,
        description="Limits on waiting for the models' servers: connect, responseHeader, idle; 0 none.",
    )
    hooks: Hooks = Field(default_factory=Hooks)
    hardware: HardwareConfig | None = Field(
        None,
        description="The machine's GPUs, declared: with the models' `vram`, `swapctl validate` reports "
        "every combination of a set that cannot fit and `swapctl plan` shows GPU memory.",
    )
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
    hosts: dict[str, HostConfig] = Field(
        default_factory=dict,
        description=f"Other machines' Docker engines, by name (`{LOCAL_NAME}` is this machine's): how to "
        "reach each. Not yet used to run models.",
    )
    network: Annotated[str | None, _read_by(parse_network), WithJsonSchema({"type": "string"})] = Field(
        None,
        description="A Docker network (a bridge one, created when missing) every model joins: swapctl "
        "reaches each at its address there, on its port, and publishes none. For swapctl in a container "
        "on that network. None: each model's port is published on 127.0.0.1.",
    )


def parse_file(document: object) -> ConfigFile:
    """The file's shape, from the document `compose.compose_document` made of it (templates
    merged in already: a template may supply any key)."""
    try:
        shape = ConfigFile.model_validate(document)
    except ValidationError as error:
        raise _translate(error) from None
    if not shape.models and not shape.peers:
        raise ConfigError("models", "no models: define at least one (or a peer that serves some)")
    return shape


def _translate(error: ValidationError) -> ConfigError:
    """pydantic's first error (an unknown key first: likely a typo) under its key path."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(part for part in first["loc"] if part not in (PROXY_TAG, CONTAINER_TAG))
    path = ".".join(str(part) for part in loc)
    kind, message = first["type"], first["msg"].removeprefix("Value error, ")
    message = message[:1].lower() + message[1:]
    if kind == "extra_forbidden" and PROXY_TAG in first["loc"] and loc[-1] in ModelConfig.model_fields:
        return ConfigError(path, f"a model with `proxy` runs no container: '{loc[-1]}' does not apply")
    if kind == "extra_forbidden":  # a Compose key swapctl does not support, or a typo
        return ConfigError(path, unsupported_key(loc) or f"unknown key '{loc[-1]}'")
    if kind == "missing":
        return ConfigError(path, "required key is missing")
    if kind == "conflict":
        return ConfigError(path, message)
    if loc[:1] == ("apiKeys",) or loc[-1:] == ("apiKey",):  # a key is never shown, even a malformed one
        return ConfigError(path, message)
    return ConfigError(path, f"{message}, got {first['input']!r}" if "got" not in message else message)


def json_schema() -> dict[str, Any]:
    """The file's JSON Schema, for editors (`swapctl config schema`)."""
    schema = ConfigFile.model_json_schema(by_alias=True)
    # a template may supply the image, so the file itself need not name one
    schema["$defs"]["ModelConfig"]["required"].remove("image")
    # Compose's extension fields, where anchors live: allowed at the top and in a model
    schema["patternProperties"] = schema["$defs"]["ModelConfig"]["patternProperties"] = {"^x-": {}}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "swapctl configuration"
    return schema
