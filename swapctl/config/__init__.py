"""The configuration: one YAML file, parsed into frozen values, every error naming its key path.

    document.py       read_yaml: one YAML document, read safely (distinct keys, bounded aliases)
    templates.py      template_dirs, load_template, apply_template, list_templates: Compose files to start from
    interpolation.py  substitute: Compose's ${VAR} rules
    envfile.py        parse_env_file, load_dotenv: the .env beside the config, and env_file
    compose.py        compose_document: Compose as users write it, before validation
    service.py        Ulimit, DeviceRequest, Network, and the parsers of the container keys
    scalars.py        durations, sizes, listen addresses, and the bound of every number
    file.py           ConfigFile: the file's shape, every default, its JSON Schema
    resolved.py       Config and Model, what the rest of swapctl reads: parse_config, load_config
    from_compose.py   a Compose file -> a swapctl config (`swapctl config from-compose`)

Names (model IDs, aliases, matrix vars) resolve through `swapctl.names`, one function for
requests, commands, hooks and the matrix alike.
"""

from swapctl.config.document import read_yaml
from swapctl.config.envfile import parse_env_file
from swapctl.config.file import ConfigFile, GroupConfig, MatrixConfig, ModelConfig, json_schema
from swapctl.config.interpolation import InterpolationError, substitute
from swapctl.config.resolved import Config, Model, Peer, Remote, Routed, Timeouts, load_config, parse_config
from swapctl.config.scalars import (
    DEFAULT_GRACE,
    MAX_CONCURRENCY,
    MAX_DURATION,
    MAX_GPUS,
    MAX_GRACE,
    MAX_HEALTH_TIMEOUT,
    MAX_REQUEST_BYTES,
    MAX_SHM_BYTES,
    check_size,
    parse_duration,
    parse_listen,
)
from swapctl.config.service import DeviceRequest, Network, Ulimit
from swapctl.config.templates import (
    TEMPLATE_DIR,
    TemplateInfo,
    list_templates,
    load_template,
    template_dirs,
    template_file,
    template_name,
)

__all__ = [
    "DEFAULT_GRACE",
    "MAX_CONCURRENCY",
    "MAX_DURATION",
    "MAX_GPUS",
    "MAX_GRACE",
    "MAX_HEALTH_TIMEOUT",
    "MAX_REQUEST_BYTES",
    "MAX_SHM_BYTES",
    "TEMPLATE_DIR",
    "Config",
    "ConfigFile",
    "DeviceRequest",
    "GroupConfig",
    "InterpolationError",
    "MatrixConfig",
    "Model",
    "ModelConfig",
    "Network",
    "Peer",
    "Remote",
    "Routed",
    "TemplateInfo",
    "Timeouts",
    "Ulimit",
    "check_size",
    "json_schema",
    "list_templates",
    "load_config",
    "load_template",
    "parse_config",
    "parse_duration",
    "parse_env_file",
    "parse_listen",
    "read_yaml",
    "substitute",
    "template_dirs",
    "template_file",
    "template_name",
]
