"""PURE: a model's request filters (llama-swap's names and semantics), applied to a JSON body
before it is forwarded.

In order: `stripParams` removes keys; `setParams` sets values; `setParamsByID` sets the
values of the ID the request named (one model served under several IDs, each with its own
settings: thinking on or off, another temperature). A key ending in `?` only fills a value
the request left out: a soft default. A dotted key (`chat_template_kwargs.enable_thinking`)
reaches into objects, creating them as needed. `model` is never stripped nor set: the
config refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PROTECTED = frozenset({"model"})  # routing reads it: a filter never touches it
SOFT = "?"  # a key's suffix: set only when the request has no value there


@dataclass(frozen=True)
class Settings:
    """Values to set: `forced` always, `soft` only where the request has none."""

    forced: Mapping[str, Any] = field(default_factory=dict)
    soft: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> Settings:
        """From a config's map, where a key ending in `?` is a soft default."""
        soft = {k.removesuffix(SOFT): v for k, v in values.items() if k.endswith(SOFT)}
        return cls({k: v for k, v in values.items() if not k.endswith(SOFT)}, soft)

    def __bool__(self) -> bool:
        return bool(self.forced or self.soft)

    def apply(self, payload: dict[str, Any]) -> None:
        for key, value in self.forced.items():
            _put(payload, key, value, replace=True)
        for key, value in self.soft.items():
            _put(payload, key, value, replace=False)


@dataclass(frozen=True)
class Filters:
    strip: tuple[str, ...] = ()
    set: Settings = field(default_factory=Settings)
    by_id: Mapping[str, Settings] = field(default_factory=dict)  # requested ID -> its settings

    def __bool__(self) -> bool:
        return bool(self.strip or self.set or self.by_id)

    def apply(self, payload: dict[str, Any], requested: str) -> dict[str, Any]:
        """A filtered copy of `payload` (a JSON object) for a request that named `requested`."""
        filtered = _copy_path_objects(payload)
        for key in self.strip:
            _drop(filtered, key)
        self.set.apply(filtered)
        by_id = self.by_id.get(requested)
        if by_id is not None:
            by_id.apply(filtered)
        return filtered


def _copy_path_objects(payload: dict[str, Any]) -> dict[str, Any]:
    """A copy deep enough that setting or dropping a dotted key never changes the original."""
    return {k: _copy_path_objects(v) if isinstance(v, dict) else v for k, v in payload.items()}


def _put(payload: dict[str, Any], key: str, value: Any, *, replace: bool) -> None:
    *parents, last = key.split(".")
    target = payload
    for part in parents:
        child = target.get(part)
        if not isinstance(child, dict):
            if child is not None and not replace:
                return  # the request set something else there: a soft default yields
            child = target[part] = {}
        target = child
    if replace or target.get(last) is None:
        target[last] = value


def _drop(payload: dict[str, Any], key: str) -> None:
    *parents, last = key.split(".")
    target: Any = payload
    for part in parents:
        target = target.get(part)
        if not isinstance(target, dict):
            return
    target.pop(last, None)
