"""PURE: a model's `metadata`, any YAML values, made into what JSON can carry (it is returned
by GET /v1/models as it was written).

What JSON has no form for is written in one: a date or a time becomes its ISO 8601 string,
a set a list of its members' strings, a key that is not a string (a number, true, null, a
date) the string JSON would make of it. What JSON cannot hold at all (NaN, infinity, binary
data) is refused with its key path, and so are two keys that become the same string.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from swapctl.errors import ConfigError


def json_metadata(value: object, where: str) -> dict[str, Any]:
    """`value` (a mapping, as the file wrote it) as JSON values; errors name `where` and the
    key path below it."""
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected a mapping of keys to values, got {type(value).__name__}")
    return _mapping(value, where)


def _mapping(value: dict[Any, Any], where: str) -> dict[str, Any]:
    built: dict[str, Any] = {}
    for key, item in value.items():
        name = _key(key, where)
        if name in built:
            raise ConfigError(where, f"two keys are both '{name}' once written as JSON: keep one")
        built[name] = _value(item, f"{where}.{name}")
    return built


def _value(value: object, where: str) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(
                where, f"JSON has no NaN or infinity, got {value!r}: write a number, or quote it"
            )
        return value
    if isinstance(value, (datetime.date, datetime.time)):  # datetime is a date
        return value.isoformat()
    if isinstance(value, dict):
        return _mapping(value, where)
    if isinstance(value, (list, tuple)):
        return [_value(item, f"{where}.{i}") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return sorted(_key(item, where) for item in value)
    if isinstance(value, (bytes, bytearray)):
        raise ConfigError(where, "binary data (!!binary) cannot be returned as JSON: write it as a string")
    raise ConfigError(where, f"a {type(value).__name__} cannot be returned as JSON")


def _key(key: object, where: str) -> str:
    """A key as JSON writes one: a string; true, false and null as JSON spells them."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool) or key is None:
        return {True: "true", False: "false", None: "null"}[key]
    if isinstance(key, (int, float, datetime.date, datetime.time)):
        text = _value(key, where)
        return text if isinstance(text, str) else repr(text)
    raise ConfigError(where, f"a key must be a string or a number, got a {type(key).__name__}")
