"""The configuration as the rest of swapctl reads it: every name and fallback resolved once.

`parse_config` turns the file's shape (`ConfigFile`, which holds every default) into a
`Config` of `Model`s whose values are final: a model's `ttl` is its own or `globalTTL`, its
`health_check_timeout` its own or the global one, each of its `timeouts` its own or the
global one's, its `cpus` its own or its `deploy.resources.limits`, so no reader combines
fallbacks. `Config` and `Model` have no defaults of their own.

Reading a file goes: YAML (`document.py`), `.env` and the templates, Compose's reading
(`compose.py`: templates merged, interpolation), the env files, then the shape (`file.py`).
`load_config` does the file I/O; `parse_config` is the rest, pure, for a document in hand.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from swapctl.config.compose import Composed, apply_env_files, compose_document, env_files
from swapctl.config.document import read_yaml
from swapctl.config.envfile import load_dotenv, read_env_text
from swapctl.config.file import (
    ConfigFile,
    GroupConfig,
    ModelConfig,
    ModelTimeoutsConfig,
    PeerConfig,
    ProxyModelConfig,
    TimeoutsConfig,
    _Routed,
    parse_file,
)
from swapctl.config.filters import Filters, Settings
from swapctl.config.hardware import fit_policy, footprint
from swapctl.config.hosts import LOCAL_NAME, Engine, parse_hosts
from swapctl.config.scalars import DEFAULT_GRACE
from swapctl.config.service import DeviceRequest, Network, Ulimit
from swapctl.config.templates import load_template, template_name
from swapctl.errors import ConfigError, UnknownModelError
from swapctl.matrix import Group, GroupPolicy, MatrixPolicy, Policy, compile_program, matrix_names
from swapctl.matrix.fit import Footprint
from swapctl.matrix.program import CostRule, compile_cost_rules
from swapctl.names import Kind, Names

# the names a request (or a hook, which starts models as requests do) and a person may use;
# computed once, as a request resolves its model on every call
REQUEST_NAMES = Kind.ID | Kind.ALIAS | Kind.REMOTE
PERSON_NAMES = Kind.VAR | Kind.ID | Kind.ALIAS  # commands act on what runs here


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long forwarding waits on a model's server, in seconds; None: no limit."""

    connect: float | None  # to open a connection
    response_header: float | None  # from sending a request to its answer's head
    idle: float | None  # between two chunks of its answer's body (the head to the first, too)


@dataclass(frozen=True)
class Routed:
    """What every model has, wherever it is served: its names, its entry in the model list,
    and how requests for it are forwarded."""

    aliases: tuple[str, ...]
    name: str | None  # its display name in the model list
    description: str | None
    metadata: Mapping[str, Any]  # JSON values, as written; the list returns them under meta.llamaswap
    unlisted: bool  # left out of the model list, still routable
    filters: Filters  # applied to a JSON body before it is forwarded
    use_model_name: str | None
    concurrency_limit: int
    timeouts: Timeouts  # each its own, else the global one's (0 in the file: None, no limit)


@dataclass(frozen=True)
class Remote(Routed):
    """A model served elsewhere (`proxy: URL`): routed like any model, never started."""

    url: str  # without a trailing slash; a request's path is appended
    api_key: SecretStr | None = field(repr=False)


@dataclass(frozen=True)
class Peer:
    """Another box whose models this one routes to."""

    name: str
    url: str
    api_key: SecretStr | None = field(repr=False)
    models: tuple[str, ...] | None  # None: `auto`, read from its GET /v1/models
    timeouts: Timeouts
    filters: Filters  # applied to the JSON bodies sent to it


@dataclass(frozen=True)
class Model(Routed):
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
    ulimits: tuple[Ulimit, ...]
    runtime: str | None
    group_add: tuple[str, ...]
    security_opt: tuple[str, ...]
    cap_add: tuple[str, ...]
    cap_drop: tuple[str, ...]
    tmpfs: tuple[str, ...]
    extra_hosts: tuple[str, ...]  # Docker's name:IP
    network_mode: str | None
    networks: tuple[Network, ...]
    pull_policy: str  # missing, always or never
    mem_limit: int | None  # bytes: its own, else deploy.resources.limits.memory
    cpus: float | None  # its own, else deploy.resources.limits.cpus
    device_requests: tuple[DeviceRequest, ...]  # deploy.resources.reservations.devices (gpus: is apart)
    vram: int | None  # bytes on each GPU it uses; None: unknown
    sleep: int | None  # vLLM's sleep level when evicted (1 or 2); None: evicted by stopping
    hosts: tuple[str, ...]  # where it may run, preferred first: `local` and names under hosts:
    ttl: int  # idle seconds before it stops, 0 never: its own ttl, else globalTTL
    health_check_timeout: int  # seconds: its own, else the global healthCheckTimeout
    send_loading_state: bool  # its own, else the global sendLoadingState


@dataclass(frozen=True)
class Config:
    """The parsed configuration, built only by `parse_config`."""

    models: Mapping[str, Model]  # the containers swapctl runs
    remotes: Mapping[str, Remote]  # `proxy:` models: served elsewhere, never started
    peers: Mapping[str, Peer]
    names: Names
    policy: Policy
    preload: tuple[str, ...]  # model IDs
    instance: str
    listen: str
    max_request_bytes: int
    request_record: int  # requests kept on record; 0: none
    capture_buffer: int  # MB for their captured bodies; 0: none
    # the file's global values, for display: each model's own already holds what applies to it
    health_check_timeout: int
    global_ttl: int
    base_dir: Path
    api_keys: tuple[SecretStr, ...] = field(repr=False)  # SecretStr: masked even so
    cors: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    warnings: tuple[str, ...]  # what the file says that is likely a mistake: unset variables
    gpu_memory: tuple[int, ...] | None  # bytes of each declared GPU, by index; None: none declared
    evict_costs: Mapping[str, CostRule]  # matrix.evict_costs by model ID, `auto` included; others cost 1
    variants: Mapping[str, str]  # filters.setParamsByID's own IDs -> model ID (they resolve as aliases)
    include_aliases_in_list: bool  # the model list shows each alias as an entry too
    # the Docker engines by host name, `local` (this machine's) among them: how to reach each.
    # What each runs (its matrix, hardware, models) is the lifecycle's, to come beside it.
    hosts: Mapping[str, Engine]
    # the network every model joins and is reached on, no port published; None: published on 127.0.0.1
    network: str | None
    # each host's own config (its models, its matrix, its GPUs) where a model runs beyond
    # `local`; empty when every model is local: then `on("local")` is this config itself
    by_host: Mapping[str, Config] = field(repr=False, compare=False)

    def on(self, host: str) -> Config:
        """The config of one host's swapper: its models, its matrix, its GPUs."""
        if not self.by_host and host == LOCAL_NAME:
            return self
        return self.by_host[host]

    @property
    def host_names(self) -> tuple[str, ...]:
        """The hosts some model runs on, `local` first (always)."""
        return (LOCAL_NAME, *(name for name in self.by_host if name != LOCAL_NAME))

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

    @functools.cached_property
    def footprints(self) -> Mapping[str, Footprint]:
        """The GPU footprint of each model that uses a GPU and declares its `vram`, on the
        declared GPUs; empty when none are declared."""
        if self.gpu_memory is None:
            return {}
        found = {
            model_id: footprint(m.vram, m.gpus, m.device_requests, len(self.gpu_memory))
            for model_id, m in self.models.items()
        }
        return {model_id: f for model_id, f in found.items() if f is not None}

    def stop_grace(self, model: str) -> float:
        """Seconds between the stop signal and a kill for `model`'s container; the default
        for a leftover of a model this config does not name."""
        found = self.models.get(model)
        return found.stop_grace_period if found else DEFAULT_GRACE

    def routed(self, model: str) -> Routed:
        """How requests for a model ID are forwarded: a container's or a `proxy:` model's."""
        found: Routed | None = self.models.get(model)
        return found if found is not None else self.remotes[model]

    def resolve(self, name: str) -> str | None:
        """A model ID from a model ID or an alias (as API requests name models); else None."""
        try:
            return self.names.resolve(name, REQUEST_NAMES)
        except ConfigError:
            return None

    def resolve_any(self, name: str) -> str:
        """A model ID from a matrix var, a model ID or an alias (as a person types them): a
        model that runs here, never one served elsewhere."""
        try:
            model = self.names.resolve(name, PERSON_NAMES)
        except ConfigError as error:
            if name in self.remotes:
                raise ConfigError("", error.message) from None
            raise UnknownModelError(name, tuple(self.models)) from None
        if model in self.remotes:  # an alias of one
            raise ConfigError(
                "", f"'{name}' names proxy: model '{model}', served elsewhere: nothing runs here"
            )
        return model


def _model(own: ModelConfig, shape: ConfigFile) -> Model:
    """A model's final values. Its own `ttl` wins even when it is 0 (never), so a model can
    be exempt from globalTTL; only an absent one takes it."""
    # every other key as written: Model and ModelConfig name the same keys, so a key added
    # to one and not the other fails every parse at once. Read as attributes, not dumped:
    # a dump would turn the frozen values (Ulimit, Network...) into dicts.
    resolved = {
        "template",
        "ttl",
        "health_check_timeout",
        "send_loading_state",
        "hosts",
        *_LIMITS,
        *_Routed.model_fields,
    }
    keys = {name: getattr(own, name) for name in type(own).model_fields if name not in resolved}
    return Model(
        **keys,
        **_routed(own, shape),
        **_limits(own),
        hosts=own.hosts or (LOCAL_NAME,),
        ttl=shape.global_ttl if own.ttl is None else own.ttl,
        health_check_timeout=(
            shape.health_check_timeout if own.health_check_timeout is None else own.health_check_timeout
        ),
        send_loading_state=(
            shape.send_loading_state if own.send_loading_state is None else own.send_loading_state
        ),
    )


def _routed(own: _Routed, shape: ConfigFile) -> dict[str, Any]:
    """The keys every model has, resolved: its filters, its timeouts over the global ones."""
    keys = {name: getattr(own, name) for name in _Routed.model_fields if name not in ("filters", "timeouts")}
    return {
        **keys,
        "filters": Filters(
            strip=own.filters.strip_params,
            set=Settings.of(own.filters.set_params),
            by_id={name: Settings.of(values) for name, values in own.filters.set_params_by_id.items()},
        ),
        "timeouts": _timeouts(own.timeouts, shape.timeouts),
    }


def _remote(own: ProxyModelConfig, shape: ConfigFile) -> Remote:
    return Remote(**_routed(own, shape), url=own.proxy, api_key=own.api_key)


def _peer(name: str, own: PeerConfig, shape: ConfigFile) -> Peer:
    limits = own.timeouts
    timeouts = Timeouts(limits.connect or None, limits.response_header or None, shape.timeouts.idle or None)
    models = None if own.models == "auto" else own.models
    filters = Filters(strip=own.filters.strip_params, set=Settings.of(own.filters.set_params))
    return Peer(
        name=name, url=own.proxy, api_key=own.api_key, models=models, timeouts=timeouts, filters=filters
    )


def _preloaded(names: Names, name: str, i: int) -> str:
    where = f"hooks.on_startup.preload.{i}"
    model = names.resolve(name, REQUEST_NAMES, where=where)
    if model in names.remotes:
        raise ConfigError(where, f"'{name}' is a proxy: model, served elsewhere: swapctl never starts it")
    return model


def _timeouts(own: ModelTimeoutsConfig, shared: TimeoutsConfig) -> Timeouts:
    """Key by key, the model's own limit, else the global one (which holds the default); 0 is
    no limit, None here."""

    def pick(key: str) -> float | None:
        value: float | None = getattr(own, key)
        return (getattr(shared, key) if value is None else value) or None

    return Timeouts(connect=pick("connect"), response_header=pick("response_header"), idle=pick("idle"))


_LIMITS = ("env_file", "deploy", "cpus", "mem_limit")  # ModelConfig keys _limits resolves


def _limits(own: ModelConfig) -> dict[str, Any]:
    """Compose's two ways to say a limit (`cpus` or `deploy.resources.limits.cpus`...) as one
    value (the file checked they agree), and its GPU form as device requests. `env_file` is
    in `environment` already."""
    limits = own.deploy.resources.limits if own.deploy else None
    devices = own.deploy.resources.reservations.devices if own.deploy else ()
    return {
        "cpus": own.cpus if own.cpus is not None else limits.cpus if limits else None,
        "mem_limit": own.mem_limit if own.mem_limit is not None else limits.memory if limits else None,
        "device_requests": tuple(
            DeviceRequest(
                driver=device.driver,
                count=-1 if device.count is None and not device.device_ids else device.count,
                device_ids=device.device_ids,
                capabilities=device.capabilities,
                options=dict(device.options),
            )
            for device in devices
        ),
    }


def _aliases(models: Mapping[str, _Routed]) -> dict[str, str]:
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


def _variants(models: Mapping[str, _Routed], aliases: Mapping[str, str]) -> dict[str, str]:
    """The IDs `filters.setParamsByID` adds: each routes to its model as an alias does. An
    entry under the model's own ID or one of its aliases adds none; any other name is taken."""
    variants: dict[str, str] = {}
    for model_id, model in models.items():
        for name in model.filters.set_params_by_id:
            where = f"models.{model_id}.filters.setParamsByID.{name}"
            owner = name if name in models else aliases.get(name) or variants.get(name)
            if owner == model_id:
                continue
            if owner is not None:
                raise ConfigError(where, f"'{name}' already names model '{owner}'")
            variants[name] = model_id
    return variants


def _api_keys(keys: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
    """The keys, each already interpolated (`${NAME}`, with an unset or empty NAME refused, in
    compose.py); errors never show a key."""
    for i, key in enumerate(keys):
        if not re.fullmatch(r"[!-~]+", key.get_secret_value()):
            raise ConfigError(f"apiKeys.{i}", "a key must be printable ASCII with no spaces, and not empty")
    return keys


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


def _policy(
    shape: ConfigFile, names: Names, models: Mapping[str, Model], gpus: tuple[int, ...] | None
) -> tuple[Policy, Names]:
    """The matrix, its fit mode or the groups (one model at a time when none), and the names
    with the matrix's vars."""
    if shape.matrix is not None and shape.groups is not None:
        raise ConfigError("groups", "a config uses either 'matrix' or 'groups', not both")
    if shape.matrix is None:
        return _group_policy(shape.groups or {}, names, tuple(models)), names
    matrix = shape.matrix
    names = matrix_names(matrix.vars, names)
    if matrix.fit is not None:
        if matrix.sets is not None:
            raise ConfigError("matrix.fit", "a matrix writes its `sets` or says `fit: gpu`, not both")
        return fit_policy(names, models, matrix.evict_costs, gpus), names
    if matrix.sets is None:
        raise ConfigError("matrix.sets", "required key is missing (or `fit: gpu`, for no sets)")
    return MatrixPolicy(compile_program(names, tuple(models), matrix.evict_costs, matrix.sets)), names


def parse_config(
    raw: object,
    templates: Mapping[str, Mapping[str, Any]] | None = None,
    base_dir: Path = Path("."),
    environ: Mapping[str, str] | None = None,
    env_file_texts: Mapping[Path, str] | None = None,
) -> Config:
    """Validate a mapping (as read from YAML) into a Config, or raise ConfigError. Strings are
    interpolated from `environ` (the process's environment when None); `env_file_texts` holds
    the text of each env file the models name, by path (one missing is a missing file)."""
    composed = compose_document(raw, templates or {}, os.environ if environ is None else environ)
    return _parse(composed, base_dir, env_file_texts or {})


def _parse(composed: Composed, base_dir: Path, env_file_texts: Mapping[Path, str]) -> Config:
    shape = parse_file(apply_env_files(composed, env_files(composed.document, base_dir), env_file_texts))
    models = {m: _model(own, shape) for m, own in shape.models.items() if isinstance(own, ModelConfig)}
    remotes = {m: _remote(own, shape) for m, own in shape.models.items() if isinstance(own, ProxyModelConfig)}
    gpus = tuple(gpu.memory for gpu in shape.hardware.gpus) if shape.hardware else None
    aliases = _aliases(shape.models)
    variants = _variants(shape.models, aliases)
    hosts = parse_hosts(shape.hosts, base_dir)
    _check_hosts(models, hosts)
    known = Names(frozenset(models), {**aliases, **variants}, remotes=frozenset(remotes))
    beyond = any(model.hosts != (LOCAL_NAME,) for model in models.values())
    on_local = {m: model for m, model in models.items() if LOCAL_NAME in model.hosts}
    policy, names = _policy(shape, _on_host(known, models, LOCAL_NAME) if beyond else known, on_local, gpus)
    names = replace(names, ids=known.ids, others={}) if beyond else names
    matrix_costs = shape.matrix.evict_costs if shape.matrix else {}
    preload = tuple(_preloaded(names, name, i) for i, name in enumerate(shape.hooks.on_startup.preload))
    config = Config(
        models=models,
        remotes=remotes,
        peers={name: _peer(name, own, shape) for name, own in shape.peers.items()},
        names=names,
        policy=policy,
        preload=preload,
        instance=shape.instance,
        listen=shape.listen,
        max_request_bytes=shape.max_request_bytes,
        request_record=shape.request_record,
        capture_buffer=shape.capture_buffer,
        health_check_timeout=shape.health_check_timeout,
        global_ttl=shape.global_ttl,
        base_dir=base_dir,
        api_keys=_api_keys(shape.api_keys),
        cors=shape.cors,
        allowed_hosts=shape.allowed_hosts,
        warnings=composed.warnings,
        gpu_memory=gpus,
        evict_costs=compile_cost_rules(names, tuple(on_local), matrix_costs),
        variants=variants,
        include_aliases_in_list=shape.include_aliases_in_list,
        hosts=hosts,
        network=_network(shape),
        by_host={},
    )
    if not beyond:
        return config
    by_host = {name: _host_config(config, shape, known, name) for name in dict.fromkeys((LOCAL_NAME, *hosts))}
    return replace(config, by_host={name: found for name, found in by_host.items() if found is not None})


def _check_hosts(models: Mapping[str, Model], hosts: Mapping[str, Engine]) -> None:
    for model_id, model in models.items():
        for i, host in enumerate(model.hosts):
            if host not in hosts:  # `local` is always among them
                known = ", ".join(hosts)
                raise ConfigError(f"models.{model_id}.hosts.{i}", f"unknown host '{host}' (hosts: {known})")


def _on_host(names: Names, models: Mapping[str, Model], host: str) -> Names:
    """The names a host's matrix may use: its own models'; the others refused with why."""
    others = {
        model_id: f"runs on {', '.join(model.hosts)}, not on {host}: a host's matrix names its own models"
        for model_id, model in models.items()
        if host not in model.hosts
    }
    return replace(names, ids=names.ids - others.keys(), others=others)


def _host_config(config: Config, shape: ConfigFile, names: Names, host: str) -> Config | None:
    """One host's config: its models, its matrix (the top-level one for `local`), its GPUs;
    None for a host no model runs on. Errors in its matrix name their key path under it."""
    models = {m: model for m, model in config.models.items() if host in model.hosts}
    if not models and host != LOCAL_NAME:
        return None
    if host == LOCAL_NAME:
        own_shape, matrix, hardware = shape, shape.matrix, shape.hardware
    else:
        own = shape.hosts[host]
        matrix, hardware = own.matrix, own.hardware
        own_shape = shape.model_copy(update={"matrix": matrix, "hardware": hardware, "groups": None})
    gpus = tuple(gpu.memory for gpu in hardware.gpus) if hardware else None
    try:
        policy, host_names = _policy(own_shape, _on_host(names, config.models, host), models, gpus)
    except ConfigError as error:
        if host == LOCAL_NAME:
            raise
        raise ConfigError(f"hosts.{host}.{error.path}", error.message) from None
    return replace(
        config,
        models=models,
        names=host_names,
        policy=policy,
        preload=tuple(m for m in config.preload if m in models),
        gpu_memory=gpus,
        evict_costs=compile_cost_rules(host_names, tuple(models), matrix.evict_costs if matrix else {}),
        variants={v: m for v, m in config.variants.items() if m in models},
        by_host={},
    )


def _network(shape: ConfigFile) -> str | None:
    """The top-level `network`; a model of its own `network_mode` conflicts with it (its
    `networks` are joined besides)."""
    for model_id, own in shape.models.items():
        if shape.network is not None and isinstance(own, ModelConfig) and own.network_mode is not None:
            raise ConfigError(
                f"models.{model_id}.network_mode",
                f"the top-level network '{shape.network}' is where swapctl reaches every model: "
                "remove network_mode (list other networks under networks: to join them too)",
            )
    return shape.network


def load_config(path: Path, environ: Mapping[str, str] = os.environ) -> Config:
    """The Config in the file at `path`, with the templates its models name, interpolated
    from `environ` over the `.env` beside it (the environment wins, as in Compose), its
    models' env files read."""
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
    composed = compose_document(raw, templates, {**load_dotenv(base_dir, environ), **environ})
    texts = {
        entry.path: read_env_text(entry.path, entry.where)
        for entry in env_files(composed.document, base_dir)
        if entry.path.is_file()
    }
    return _parse(composed, base_dir, texts)
