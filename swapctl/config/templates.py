"""Templates: a model may start from a Compose file of one service, found only by name.

`load_template` reads one (from `compose-templates/` beside the config, else the one
shipped with swapctl); `apply_template` merges it under a model's own keys. A template's
`x-swapctl` holds swapctl's keys for the model (`port`, `health`...) and what `swapctl
templates` shows about it (`engine`, `serves`, `description`), which no model receives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import swapctl
from swapctl.config.document import read_yaml
from swapctl.errors import ConfigError

TEMPLATE_DIR = "compose-templates"
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")  # no '/', no '..'
ABOUT_KEYS = ("engine", "serves", "description")  # x-swapctl keys that describe, for `swapctl templates`


def template_name(model_id: object, name: object) -> str:
    """`name` when it can only name a file in a templates folder: no path, no '..'."""
    if not isinstance(name, str) or len(name) > 64 or not TEMPLATE_NAME.fullmatch(name):
        raise ConfigError(
            f"models.{model_id}.template",
            f"a template name is letters, digits, '-', '_' and single dots (NAME for "
            f"{TEMPLATE_DIR}/NAME.yaml), got {name!r}",
        )
    return name


def apply_template(
    name: str, raw: Mapping[str, Any], templates: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """A model's keys over its template's (environment and labels merged key by key)."""
    template = raw.get("template")
    if template is None:
        return dict(raw)
    template = template_name(name, template)
    if template not in templates:
        raise ConfigError(f"models.{name}.template", f"no template '{template}' in {TEMPLATE_DIR}/")
    merged = {**templates[template], **raw}
    for key in ("environment", "labels"):
        base, own = _mapping(templates[template].get(key)), _mapping(raw.get(key))
        if isinstance(base, dict) and isinstance(own, dict):
            merged[key] = {**base, **own}
    return merged


def _mapping(value: object) -> object:
    """Compose's list form (`- KEY=VALUE`, `- KEY`) as a mapping, so the two forms merge."""
    if not isinstance(value, list):
        return value
    pairs = [str(item).partition("=") for item in value]
    return {key: (item if sep else None) for key, sep, item in pairs}


def template_dirs(base_dir: Path) -> tuple[Path, ...]:
    """Where templates are looked for: beside the config, then those shipped with swapctl,
    in the package when installed from a wheel (setup.py puts them there), else at the top
    of the checkout it runs from."""
    package = Path(swapctl.__file__).resolve().parent
    return (base_dir / TEMPLATE_DIR, package / "compose_templates", package.parent / TEMPLATE_DIR)


def template_file(name: str, base_dir: Path) -> Path | None:
    """The file a template name stands for: the first folder of `template_dirs` that has it."""
    return next(
        (path for folder in template_dirs(base_dir) if (path := folder / f"{name}.yaml").is_file()), None
    )


def load_template(name: str, base_dir: Path) -> dict[str, Any]:
    """A template's single Compose service, its `x-swapctl` keys lifted to the top (but the
    ones that describe it); empty when no templates folder has it."""
    path = template_file(name, base_dir)
    if path is None:
        return {}
    service, extra = _read_service(path)
    return {**service, **{key: value for key, value in extra.items() if key not in ABOUT_KEYS}}


def _read_service(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The one service of the Compose file at `path`, and its `x-swapctl` mapping; a file of
    another shape names itself and the key."""
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
            f"services.{service_name}: a service is a mapping of Compose keys, got {type(service).__name__}",
        )
    service = dict(service)
    extra = service.pop("x-swapctl", None)
    if not isinstance(extra, dict | None):
        raise ConfigError(
            str(path),
            f"services.{service_name}.x-swapctl: must be a mapping of swapctl keys, got {type(extra).__name__}",
        )
    return service, extra or {}


@dataclass(frozen=True)
class TemplateInfo:
    """What `swapctl templates` shows of one template, as its file says it."""

    name: str
    path: Path
    engine: str
    image: str
    port: int | None
    health: str
    serves: tuple[str, ...]
    description: str


def describe_template(name: str, path: Path) -> TemplateInfo:
    service, extra = _read_service(path)
    serves, port = extra.get("serves", []), extra.get("port", 8080)  # 8080: a model's default port
    return TemplateInfo(
        name=name,
        path=path,
        engine=str(extra.get("engine") or "-"),
        image=str(service.get("image") or "-"),
        port=port if isinstance(port, int) and not isinstance(port, bool) else None,
        health=str(extra.get("health") or "/health"),
        serves=tuple(str(item) for item in serves) if isinstance(serves, list) else (str(serves),),
        description=str(extra.get("description") or ""),
    )


def list_templates(base_dir: Path) -> list[TemplateInfo]:
    """Every template a config in `base_dir` can name, by name; one beside the config hides a
    shipped one of the same name, as `load_template` finds it first."""
    found: dict[str, Path] = {}
    for folder in template_dirs(base_dir):
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else ():
            if TEMPLATE_NAME.fullmatch(path.stem):
                found.setdefault(path.stem, path)
    return [describe_template(name, path) for name, path in sorted(found.items())]
