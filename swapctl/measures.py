"""Measurements kept across restarts, and the eviction costs `evict_costs: auto` makes of them.

For each model, per spec hash: its last KEPT start durations (from its container's start
to ready), its last KEPT wake durations (from a vLLM sleep) and its last measured GPU
footprint. A start or footprint recorded under another spec hash than the one kept
replaces what was kept: a changed config is another container, whose old figures say
nothing of the new one.

They live in one small JSON file per instance, `<state dir>/measures/<instance>.json`, and
not in container labels as the rest of swapctl's state does: labels are fixed when a
container is created, before anything about it is measured, and a stopped model's container
is removed with its labels, so the measurements would go exactly when they matter (a
stopped model's cost is what its next start takes).

    {"version": 1, "models": {"chat": {"spec_hash": "3f2a...", "starts": [12.4, 11.9],
     "wakes": [], "footprint": {"0": 20507804057}}}}

Only `swapctl up` writes it (one per instance, by its lock); `plan` and `validate` read it.
A file that cannot be read, is not such JSON, or has another version warns once and counts
as empty: the measurements are a hint, and are measured again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swapctl.matrix.program import AUTO
from swapctl.spec import build_spec

if TYPE_CHECKING:
    import asyncio

    from swapctl.config import Config
    from swapctl.matrix import Policy

log = logging.getLogger("swapctl")
VERSION = 1
KEPT = 20  # durations kept per model, of each kind: the median of 20 shrugs off a slow start


@dataclass(frozen=True)
class Measured:
    """What is kept of one model, measured while its container had `spec_hash`."""

    spec_hash: str
    starts: tuple[float, ...] = ()  # seconds, oldest first
    wakes: tuple[float, ...] = ()  # seconds, oldest first
    footprint: tuple[tuple[int, int], ...] = ()  # (device index, bytes) by index; () not measured

    def to_json(self) -> dict[str, Any]:
        return {
            "spec_hash": self.spec_hash,
            "starts": [round(seconds, 3) for seconds in self.starts],
            "wakes": [round(seconds, 3) for seconds in self.wakes],
            "footprint": {str(index): held for index, held in self.footprint},
        }


def _seconds(value: object) -> tuple[float, ...]:
    if not isinstance(value, list) or not all(_is_seconds(v) for v in value):
        raise ValueError("durations must be a list of seconds")
    return tuple(float(v) for v in value[-KEPT:])


def _is_seconds(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _footprint(value: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, dict):
        raise ValueError("a footprint must map device indexes to bytes")
    found = []
    for index, held in value.items():
        if not (isinstance(index, str) and index.isdigit() and type(held) is int and held >= 0):
            raise ValueError("a footprint must map device indexes to bytes")
        found.append((int(index), held))
    return tuple(sorted(found))


def parse_measures(document: object) -> dict[str, Measured]:
    """PURE: the measurements of a file's document; ValueError when it is not one of VERSION."""
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise ValueError("not a measurements file")
    if document.get("version") != VERSION:
        raise ValueError(f"version {document.get('version')!r}, where this swapctl reads {VERSION}")
    kept: dict[str, Measured] = {}
    for model, entry in document["models"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("spec_hash"), str):
            raise ValueError(f"model {model!r} has no spec_hash")
        kept[model] = Measured(
            entry["spec_hash"],
            _seconds(entry.get("starts", [])),
            _seconds(entry.get("wakes", [])),
            _footprint(entry.get("footprint", {})),
        )
    return kept


def dump_measures(kept: Mapping[str, Measured]) -> str:
    """PURE: the file's text."""
    models = {model: measured.to_json() for model, measured in sorted(kept.items())}
    return json.dumps({"version": VERSION, "models": models}, indent=1) + "\n"


def measures_path(directory: Path, instance: str) -> Path:
    """Where the measurements of `instance` live, under the user's state directory."""
    return directory / "measures" / f"{instance}.json"


class MeasureStore:
    """The measurements of one instance, in memory, written to `path` after each change (None:
    kept in memory only). Records come from the event loop's thread; with a loop running,
    the file is written in a thread, never on the loop (a state directory may sit on a slow
    disk), by one writer that writes the latest state until nothing changed since."""

    def __init__(self, path: Path | None = None, kept: Mapping[str, Measured] | None = None) -> None:
        self.path = path
        self.kept: dict[str, Measured] = dict(kept or {})
        self.generation = 0  # counts changes: what is derived from the store is derived again when it moves
        self._writer: asyncio.Task[None] | None = None
        self._failed = False  # a write failed and was logged; logged again only after one succeeded

    @classmethod
    def load(cls, path: Path) -> MeasureStore:
        """The store kept at `path`; empty when there is none yet, or (with one warning) when
        it cannot be read."""
        try:
            kept = parse_measures(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            kept = {}
        except (OSError, UnicodeError, ValueError, RecursionError) as error:
            log.warning("warning: measurements in %s not read (%s): starting with none kept", path, error)
            kept = {}
        return cls(path, kept)

    def get(self, model: str, spec_hash: str) -> Measured | None:
        """What is kept of `model` measured with `spec_hash`; None when nothing is."""
        found = self.kept.get(model)
        return found if found is not None and found.spec_hash == spec_hash else None

    def record_start(self, model: str, spec_hash: str, seconds: float) -> None:
        """A start of `model` took `seconds`, its container ready."""
        if _is_seconds(seconds):
            old = self._for(model, spec_hash)
            self._keep(model, replace(old, starts=(*old.starts, seconds)[-KEPT:]))

    def record_wake(self, model: str, spec_hash: str, seconds: float) -> None:
        """A wake of `model` from sleep took `seconds`."""
        if _is_seconds(seconds):
            old = self._for(model, spec_hash)
            self._keep(model, replace(old, wakes=(*old.wakes, seconds)[-KEPT:]))

    def record_footprint(self, model: str, spec_hash: str, memory: Iterable[tuple[int, int]]) -> None:
        """What `model` held on each GPU (device index, bytes) once ready."""
        self._keep(model, replace(self._for(model, spec_hash), footprint=tuple(sorted(memory))))

    def _for(self, model: str, spec_hash: str) -> Measured:
        """What is kept of `model` for `spec_hash`, or a fresh entry that replaces another hash's."""
        return self.get(model, spec_hash) or Measured(spec_hash)

    def _keep(self, model: str, measured: Measured) -> None:
        self.kept[model] = measured
        self.generation += 1
        if self.path is None:
            return
        import asyncio  # here, not at the top: `plan` and `validate` only read

        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a script, a test): write now
            self._write(dump_measures(self.kept))
            return
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_behind())

    async def _write_behind(self) -> None:
        import asyncio

        written = -1
        while written != self.generation:
            written = self.generation
            await asyncio.to_thread(self._write, dump_measures(self.kept))

    async def flush(self) -> None:
        """Wait until the latest change is written."""
        if self._writer is not None:
            await self._writer

    def _write(self, text: str) -> None:
        """Write atomically: a temporary file beside it, then a rename. A failure is logged."""
        assert self.path is not None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
            )
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    file.write(text)
                os.replace(temporary, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
        except OSError as error:
            if not self._failed:
                log.warning("warning: measurements not written to %s: %s", self.path, error)
            self._failed = True
            return
        self._failed = False


# --- evict_costs: auto ------------------------------------------------------------------------


def auto_cost(seconds: Sequence[float]) -> int | None:
    """PURE: the median of `seconds` in whole seconds, rounded up, at least 1; None for none."""
    return max(1, math.ceil(statistics.median(seconds))) if seconds else None


@dataclass(frozen=True)
class Cost:
    """A model's eviction cost and where it came from, as `swapctl plan` shows it."""

    cost: int
    source: str  # evict_costs, default, or auto: ...

    def to_json(self) -> dict[str, object]:
        return {"cost": self.cost, "source": self.source}


def _auto(measured: Measured | None, sleeps: bool) -> Cost:
    """An auto model's cost: its starts' median, or, for a model evicted by a sleep, its wakes'."""
    kind = "wake" if sleeps else "start"
    seconds = () if measured is None else measured.wakes if sleeps else measured.starts
    cost = auto_cost(seconds)
    if cost is None:
        return Cost(1, "auto: not measured yet")
    count = len(seconds)
    median = statistics.median(seconds)
    return Cost(cost, f"auto: median of {count} {kind}{'s' * (count != 1)} ({median:.1f} s)")


def effective_costs(config: Config, store: MeasureStore) -> dict[str, Cost]:
    """Each model's eviction cost as decisions take it: its `evict_costs` entry, measured for
    `auto` (with the measurements of its current spec hash), else 1."""
    costs: dict[str, Cost] = {}
    for model in config.models:
        rule = config.evict_costs.get(model)
        if rule == AUTO:
            kept = store.get(model, build_spec(config, model).spec_hash)
            costs[model] = _auto(kept, config.models[model].sleep is not None)
        elif isinstance(rule, int):
            costs[model] = Cost(rule, "evict_costs")
        else:
            costs[model] = Cost(1, "default")
    return costs


def costed_policy(config: Config, store: MeasureStore, costs: Mapping[str, Cost] | None = None) -> Policy:
    """The config's policy, deciding with the measured cost of each `auto` model; `costs`, the
    `effective_costs` of the caller that has them already."""
    if AUTO not in config.evict_costs.values():
        return config.policy
    costs = costs if costs is not None else effective_costs(config, store)
    return config.policy.with_costs(
        {m: c.cost for m, c in costs.items() if config.evict_costs.get(m) == AUTO}
    )


def kept_footprints(config: Config, store: MeasureStore) -> dict[str, tuple[tuple[int, int], ...]]:
    """The last measured footprint of each model of `config`, where one was measured with its
    current spec hash."""
    found = {model: store.get(model, build_spec(config, model).spec_hash) for model in config.models}
    return {model: kept.footprint for model, kept in found.items() if kept is not None and kept.footprint}
