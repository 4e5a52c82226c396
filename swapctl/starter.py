"""The starter config `swapctl init` writes: this machine's GPUs as `hardware`, one model per
`--model ID=TEMPLATE[:MODELPATH]`, a matrix to grow, and comments a newcomer can follow.

Pure but for reading the templates: `starter_config` turns what init was given (the GPU
inventory's snapshot, the models, the listen address) into YAML text; errors are
`ConfigError`s naming the option.

Where a model path goes is read from the template's own service, as its engine takes it:
- a `-m`, `--model` or `--model-id` argument in its command (llama.cpp, vLLM, TEI): the
  path replaces the argument's value. A path on this machine (`/`, `./`, `../`, `~`) is
  mounted read-only: its folder at /models, the argument naming the file inside it; any
  other value (a Hugging Face ID such as `Qwen/Qwen2.5-7B-Instruct`) is passed as written.
- a `PRELOAD_MODELS` environment variable (speaches): the ID to preload, and `useModelName`,
  so requests for the model's ID ask the engine for that one.
- a command of one word (LocalAI's model name): the path replaces it.
Other templates (Kokoro) serve one model and take no path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from swapctl.config.scalars import is_loopback, parse_listen
from swapctl.config.templates import TemplateInfo, list_templates, load_template
from swapctl.errors import ConfigError
from swapctl.gpus import NoGpu, Snapshot

MODEL_FLAGS = ("-m", "--model", "--model-id")
MOUNT = "/models"  # where a model file's folder appears inside its container
PATH_STARTS = ("/", "./", "../", "~")
REQUIRED_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):?\?")  # ${NAME:?message}
VAR_NAME = re.compile(r"[A-Za-z0-9._-]{1,32}")  # a matrix var (see the matrix's docs)


@dataclass(frozen=True)
class Starter:
    """The config's text, and what the user must do before it validates."""

    text: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelChoice:
    """One `--model ID=TEMPLATE[:MODELPATH]`."""

    id: str
    template: str
    path: str | None = None


def parse_model_option(text: str) -> ModelChoice:
    """`qwen=llama-server:/models/qwen.gguf` -> ModelChoice('qwen', 'llama-server', '/models/qwen.gguf')."""
    model, equals, rest = text.partition("=")
    template, colon, path = rest.partition(":")
    if not equals or not model.strip() or not template.strip() or (colon and not path.strip()):
        raise ConfigError("--model", f"expected ID=TEMPLATE[:MODELPATH], got {text!r}")
    return ModelChoice(model.strip(), template.strip(), path.strip() if colon else None)


def starter_config(
    models: Sequence[ModelChoice],
    gpus: Snapshot | NoGpu,
    listen: str,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
) -> Starter:
    """The config's text and notes; `base_dir` is the folder it will be written to (templates beside it
    count, as they will when it loads). `environ` tells which variables a template needs
    that are unset (the process's environment by default)."""
    known = {info.name: info for info in list_templates(base_dir)}
    env = os.environ if environ is None else environ
    try:
        host, _ = parse_listen(listen)
    except ValueError as error:
        raise ConfigError("--listen", str(error)) from None
    if not models:
        names = ", ".join(sorted(known))
        raise ConfigError("--model", f"name at least one: ID=TEMPLATE[:MODELPATH], TEMPLATE one of {names}")
    if len({m.id for m in models}) != len(models):
        raise ConfigError("--model", "each model ID may be given once")
    parts = [_HEAD, _listen_part(listen, host), _hardware_part(gpus), "models:"]
    notes = [] if is_loopback(host) or env.get("SWAPCTL_API_KEY") else [_KEY_NOTE]
    for choice in models:
        if choice.template not in known:
            names = ", ".join(sorted(known))
            raise ConfigError(
                f"--model {choice.id}", f"no template '{choice.template}'; the templates are: {names}"
            )
        parts.append(_model_part(choice, known[choice.template], base_dir, env))
        needed = required_variables(known[choice.template], env)
        notes += [
            f"model '{choice.id}': template {choice.template} needs the variable {name}" for name in needed
        ]
    parts.append(_matrix_part([m.id for m in models]))
    text = "\n".join(parts)
    yaml.safe_load(text)  # a mistake here is swapctl's, never the user's: fail before writing
    return Starter(text, tuple(dict.fromkeys(notes)))


def required_variables(info: TemplateInfo, environ: Mapping[str, str]) -> list[str]:
    """The variables a template's file requires (`${NAME:?...}`) that `environ` lacks."""
    needed = REQUIRED_VARIABLE.findall(info.path.read_text(encoding="utf-8"))
    return [name for name in dict.fromkeys(needed) if not environ.get(name)]


_HEAD = """\
# swapctl's configuration, written by `swapctl init` for this machine.
#
# Each model is one Docker container. A request that names a model starts its container
# (stopping others when the matrix below says they cannot run together), waits for its
# health check, then forwards the request. Next steps:
#   swapctl validate           check this file (run it after every change)
#   swapctl up                 serve the OpenAI-compatible endpoint
#   swapctl templates          the templates a model can start from
#   swapctl config schema      a JSON Schema of every key, for editors
# Every key, with what it does: config.example.yaml in swapctl's sources.
#
# `${NAME}` and `${NAME:-default}` read environment variables (and a .env file beside
# this one) when the config loads.

# instance: labels this swapctl's containers; two configs with different instances never
# touch each other's containers. Default: default.
# instance: default
"""

_KEY_NOTE = "set SWAPCTL_API_KEY (the key clients must send) before swapctl validate and up"


def _listen_part(listen: str, host: str) -> str:
    text = f"# listen: where `swapctl up` serves (HOST:PORT).\nlisten: {_scalar(listen)}\n"
    if is_loopback(host):
        return (
            text + "# Only this machine can reach it. To serve other machines, listen on 0.0.0.0:PORT\n"
            '# and require a key: apiKeys: ["${SWAPCTL_API_KEY}"]\n'
        )
    return text + (
        "# Other machines can reach it, so every request needs a key (Authorization: Bearer KEY,\n"
        "# an OpenAI client's api_key). The key is read from the environment when the config\n"
        "# loads: set SWAPCTL_API_KEY (or put it in a .env file beside this one) before\n"
        "# `swapctl validate` and `swapctl up`.\n"
        'apiKeys: ["${SWAPCTL_API_KEY}"]\n'
    )


def _hardware_part(gpus: Snapshot | NoGpu) -> str:
    if isinstance(gpus, NoGpu) or not gpus.devices:
        reason = gpus.reason if isinstance(gpus, NoGpu) else "the driver reports none"
        return (
            "# hardware: none declared, as no GPU was found on this machine:\n"
            f"# {reason}.\n"
            "# On a machine with GPUs, declare each one's memory (device index order) and each\n"
            "# model's `vram`, and `swapctl validate` checks every set of the matrix fits:\n"
            "# hardware:\n"
            "#   gpus: [{memory: 24GiB}, {memory: 24GiB}]\n"
        )
    lines = [
        "# hardware: the GPUs found on this machine (NVIDIA, through NVML), in device index order,",
        "# each with its memory. With each model's `vram`, `swapctl validate` checks that every",
        "# set of the matrix fits, and `swapctl plan` shows each GPU's memory before and after.",
        "hardware:",
        "  gpus:",
    ]
    for device in gpus.devices:
        mib = device.memory_total // 2**20  # whole MiB, at most what the driver reports
        lines.append(f"    - {{memory: {mib}MiB}}  # GPU {device.index}: {device.name}, {mib / 1024:.2f} GiB")
    return "\n".join(lines) + "\n"


def _model_part(choice: ModelChoice, info: TemplateInfo, base_dir: Path, environ: Mapping[str, str]) -> str:
    service = load_template(info.name, base_dir)
    keys = _path_keys(choice, info, service) if choice.path else {}
    serves = ", ".join(info.serves) or "-"
    lines = [f"  # {info.description or info.name} ({info.engine}; serves {serves})."]
    if choice.path is None and _takes_path(service):
        lines += [
            "  # No model was named, so the template's default is used: name yours in the keys",
            f"  # below, or with `swapctl init --model {choice.id}={info.name}:MODEL --force`.",
        ]
    for name in required_variables(info, environ):
        lines.append(
            f"  # The template requires the environment variable {name}: set it (or put it in .env)."
        )
    lines += [f"  {_scalar(choice.id)}:", f"    template: {_scalar(info.name)}"]
    lines += [f"    {key}: {json.dumps(value)}" for key, value in keys.items()]
    lines += _model_hints(service)
    return "\n".join(lines) + "\n"


def _model_hints(service: Mapping[str, Any]) -> list[str]:
    """Commented keys a newcomer adds next."""
    on_devices = {"gpus", "deploy", "devices"} & set(service)  # its GPUs are the template's already
    hints = [] if on_devices else [("gpus: all", "the GPUs it may use: all, a count, or IDs")]
    hints += [
        ("vram: 18GiB", "GPU memory it holds on each GPU it uses (see hardware)"),
        ("aliases: [other-name]", "more names clients may ask for it by"),
        ("ttl: 600", "stop it after this many idle seconds"),
    ]
    return [f"    # {key:<22}  # {why}" for key, why in hints]


def _takes_path(service: Mapping[str, Any]) -> bool:
    command = service.get("command")
    environment = service.get("environment")
    has_flag = isinstance(command, list) and any(str(arg) in MODEL_FLAGS for arg in command[:-1])
    one_word = isinstance(command, list) and len(command) == 1
    return has_flag or one_word or (isinstance(environment, dict) and "PRELOAD_MODELS" in environment)


def _path_keys(choice: ModelChoice, info: TemplateInfo, service: Mapping[str, Any]) -> dict[str, Any]:
    """The model's own keys that put `choice.path` where the template's engine takes it."""
    path = str(choice.path)
    command = service.get("command")
    environment = service.get("environment")
    if isinstance(command, list) and any(str(arg) in MODEL_FLAGS for arg in command[:-1]):
        at = next(i for i, arg in enumerate(command) if str(arg) in MODEL_FLAGS) + 1
        if not path.startswith(PATH_STARTS):
            return {"command": [*command[:at], _escaped(path), *command[at + 1 :]]}
        local = Path(path).expanduser().resolve()
        inside = str(PurePosixPath(MOUNT) / local.name)
        kept = [v for v in service.get("volumes") or [] if not _mounts_at(v, MOUNT)]
        return {
            "command": [*command[:at], inside, *command[at + 1 :]],
            "volumes": [*kept, _escaped(f"{local.parent}:{MOUNT}:ro")],
        }
    if isinstance(environment, dict) and "PRELOAD_MODELS" in environment:
        return {
            "environment": {"PRELOAD_MODELS": json.dumps([_escaped(path)])},
            "useModelName": _escaped(path),
        }
    if isinstance(command, list) and len(command) == 1:
        return {"command": [_escaped(path)]}
    raise ConfigError(
        f"--model {choice.id}",
        f"template '{info.name}' serves the one model its image holds: it takes no model path "
        f"(give --model {choice.id}={info.name})",
    )


def _mounts_at(volume: object, target: str) -> bool:
    """Whether a short-syntax volume (HOST:CONTAINER[:MODE], HOST maybe `${VAR:-default}`)
    mounts at `target`."""
    text = str(volume)
    return text.endswith(f":{target}") or f":{target}:" in text


def _escaped(value: str) -> str:
    """A value as written, not interpolated: `$` is Compose's `$$`."""
    return value.replace("$", "$$")


def _scalar(text: str) -> str:
    """`text` plain where YAML reads it back as the same string, else JSON-quoted."""
    try:
        plain = yaml.safe_load(f"{text}: 0")
    except yaml.YAMLError:
        plain = None
    return text if plain == {text: 0} and not text.startswith(("#", "*", "&", "!")) else json.dumps(text)


def _matrix_part(ids: Sequence[str]) -> str:
    names = _var_names(ids)
    lines = [
        "# matrix: which models may run together. `vars` are short names for the models;",
        "# `sets` are expressions over them: `a & b` together, `a | b` one or the other,",
        "# parentheses to group. A request for a model stops the running models its sets do not",
        "# allow beside it, picking the choice that stops the cheapest. A model in no set runs alone.",
    ]
    lines += ["matrix:", "  vars:"]
    lines += [f"    {_scalar(var)}: {_scalar(model)}" for var, model in names.items()]
    vars_ = list(names)
    lines += ["  sets:", f"    one-at-a-time: {json.dumps(' | '.join(vars_))}  # each model alone"]
    if len(vars_) > 1:
        lines.append(
            f'    # together: "{" & ".join(vars_)}"  # run at once, when they fit in memory together'
        )
    lines += [
        "  # evict_costs: {"
        + f"{vars_[0]}: 10"
        + "}  # a slow start costs more to stop (default 1; `auto` measures it)",
        "  # Or, instead of sets, `fit: gpu`: any models whose `vram` fits the GPUs under",
        "  # `hardware` run together (every model on a GPU then needs its `vram`).",
    ]
    return "\n".join(lines) + "\n"


def _var_names(ids: Sequence[str]) -> dict[str, str]:
    """A matrix var per model ID: the ID itself where it can be one, else m1, m2..."""
    names: dict[str, str] = {}
    for index, model in enumerate(ids, 1):
        var = model if VAR_NAME.fullmatch(model) else f"m{index}"
        names[var if var not in names else f"m{index}"] = model
    return names
