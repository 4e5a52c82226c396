"""Templates: a model may start from a Compose file of one service, found only by name.

`load_template` reads one (from `compose-templates/` beside the config, else the one
shipped with swapctl); `apply_template` merges it under a model's own keys.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import swapctl
from swapctl.config.document import read_yaml
from swapctl.errors import ConfigError

TEMPLATE_DIR = "compose-templates"
TEMPLATE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")  # no '/', no '..'


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
        base, own = templates[template].get(key), raw.get(key)
        if isinstance(base, dict) and isinstance(own, dict):
            merged[key] = {**base, **own}
    return merged


def template_dirs(base_dir: Path) -> tuple[Path, ...]:
    """Where templates are looked for: beside the config, then those shipped with swapctl,
    in the package when installed from a wheel (setup.py puts them there), else at the top
    of the checkout it runs from."""
    package = Path(swapctl.__file__).resolve().parent
    return (base_dir / TEMPLATE_DIR, package / "compose_templates", package.parent / TEMPLATE_DIR)


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
