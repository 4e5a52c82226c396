"""PURE: do models fit the declared GPUs together? An exact placement search, and the check
of every model alone and every combination of every matrix set against it.

A model's `Footprint` is the memory it holds on each GPU it uses and how many GPUs it uses,
some of them maybe pinned to device indexes. Models fit together when each gets its number
of distinct devices, its pinned ones among them, and no device holds more than its memory.
That is bin packing, so `place` searches: pinned memory first, then the other models
largest first, trying each choice of devices, remembering the free-memory states that
failed. Tens of models on a few GPUs take microseconds.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations

from swapctl.matrix.expand import expand_set
from swapctl.matrix.program import Program, combinations_count

# A set that expands to more combinations than this is not checked combination by
# combination (the expansion is exponential); the report names it instead.
MAX_CHECKED = 10_000


@dataclass(frozen=True)
class Footprint:
    """What one model holds: `vram` bytes on each of `count` distinct GPUs, `pinned` among them."""

    vram: int
    count: int
    pinned: tuple[int, ...] = ()


@dataclass(frozen=True)
class Misfit:
    """Models that cannot run together on the GPUs: a set's combination, or one model alone
    (`set` None). `need` is their memory in all, `capacity` the GPUs' in all."""

    set: str | None
    combination: tuple[str, ...]
    need: int
    capacity: int


@dataclass(frozen=True)
class FitReport:
    misfits: tuple[Misfit, ...]
    unchecked: tuple[str, ...]  # sets with more than MAX_CHECKED combinations


def format_gpu_memory(size: int) -> str:
    """`size` bytes exactly, as a person reads GPU memory: `18 GiB`, `1.5 GiB`, `18000 MiB`,
    else bytes (a misfit by one byte must not read as equal sizes)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale and (size * 100) % scale == 0:
            return f"{size / scale:.2f}".rstrip("0").rstrip(".") + f" {unit}"
    return f"{size} bytes"


def pinned(footprints: Mapping[str, Footprint], placed: Mapping[str, Sequence[int]]) -> dict[str, Footprint]:
    """`footprints` with each model of `placed` pinned to the devices its container was given
    (a container's GPUs are fixed when it starts); a placement that does not match the
    model's count of GPUs is ignored."""
    found = dict(footprints)
    for model, devices in placed.items():
        footprint = found.get(model)
        if footprint is not None and len(set(devices)) == footprint.count:
            found[model] = Footprint(footprint.vram, footprint.count, tuple(sorted(set(devices))))
    return found


def held_devices(devices: Sequence[DeviceUse] | None) -> dict[str, tuple[int, ...]]:
    """Model -> the devices it holds under a placement `use` answered."""
    held: dict[str, list[int]] = {}
    for device in devices or ():
        for model in device.models:
            held.setdefault(model, []).append(device.index)
    return {model: tuple(found) for model, found in held.items()}


def need(footprints: Mapping[str, Footprint]) -> int:
    return sum(f.vram * f.count for f in footprints.values())


@dataclass
class Steps:
    """A budget of search steps shared by calls of `place`: packing is NP-hard, and a few
    near-full packings of tens of models take seconds to settle."""

    left: int


class _OutOfSteps(Exception):
    pass


def place(
    capacities: Sequence[int], footprints: Mapping[str, Footprint], steps: Steps | None = None
) -> dict[str, tuple[int, ...]] | None:
    """The devices each model gets (sorted indexes) so that all fit `capacities`, or None.
    With `steps`, a search that spends them all also answers None: for callers that must
    stay quick and may safely count such a set as not fitting."""
    free = list(capacities)
    for footprint in footprints.values():
        if len(set(footprint.pinned)) != len(footprint.pinned) or footprint.count < len(footprint.pinned):
            raise ValueError(f"a footprint pins distinct devices, at most its count: {footprint}")
        for device in footprint.pinned:
            if device >= len(free):
                return None
            free[device] -= footprint.vram
    if any(amount < 0 for amount in free):
        return None
    rest = sorted(
        (f.count - len(f.pinned), f.vram, name) for name, f in footprints.items() if f.count > len(f.pinned)
    )
    rest.reverse()  # those needing the most GPUs, then the largest, first: they fail soonest
    models = [(name, footprints[name], extra) for extra, _, name in rest]
    # of the last k models of `models`: their memory, and their vram once per GPU, ascending
    needs: list[int] = [0]
    units: list[tuple[int, ...]] = [()]
    for _, footprint, extra in reversed(models):
        needs.append(needs[-1] + footprint.vram * extra)
        units.append(tuple(sorted((*units[-1], *[footprint.vram] * extra))))
    distinct = tuple(sorted({d for _, f, _ in models for d in f.pinned}))
    try:
        chosen = _search(free, models, _Search(needs, units, distinct, steps))
    except _OutOfSteps:
        return None
    if chosen is None:
        return None
    return {
        name: tuple(sorted((*footprint.pinned, *chosen.get(name, ()))))
        for name, footprint in footprints.items()
    }


@dataclass
class _Search:
    """What `_search` keeps across its calls. Devices that no model left to place pins are
    interchangeable but for their free memory: a state holds their free amounts sorted, and
    a choice among them is tried once per multiset of free amounts, so GPUs of one size are
    not told apart (8 equal GPUs would otherwise multiply the states by up to 8!)."""

    needs: list[int]  # needs[k]: the memory of the last k models to place
    units: list[tuple[int, ...]]  # units[k]: their vram, once per GPU each still needs, ascending
    distinct: tuple[int, ...]  # the devices a model left to place pins: told apart
    steps: Steps | None  # what calls of `_search` may still spend; None: no limit
    failed: set[tuple[object, ...]] = field(default_factory=set)  # states known to fail

    def state(self, free: Sequence[int], left: int) -> tuple[object, ...]:
        return left, *self.choice(free, range(len(free)))

    def choice(self, free: Sequence[int], devices: Iterable[int]) -> tuple[object, ...]:
        told = tuple((d, free[d]) for d in devices if d in self.distinct)
        alike = sorted(free[d] for d in devices if d not in self.distinct)
        return told, tuple(alike)


def _may_fit(free: Sequence[int], units: Sequence[int], need: int) -> bool:
    """False when `units` (vram amounts, ascending, each on its own device) surely cannot fit
    `free`: a device with room for one unit only holds at most the largest that fits it, the
    rest of its memory lost; and units too big to share any device (each over half the most
    free) need devices of their own, the i-th largest one the i-th most free."""
    if not free:
        return False
    two = units[0] + units[1] if len(units) > 1 else math.inf
    room = 0
    for amount in free:
        if amount >= two:
            room += amount
        elif amount >= units[0]:
            room += units[bisect_right(units, amount) - 1]
    if room < need:
        return False
    most = max(free)
    alone = units[bisect_right(units, most // 2) :]
    frees = sorted(free, reverse=True)
    return len(alone) <= len(frees) and all(
        unit <= amount for unit, amount in zip(reversed(alone), frees, strict=False)
    )


def _search(
    free: list[int], rest: list[tuple[str, Footprint, int]], known: _Search
) -> dict[str, tuple[int, ...]] | None:
    """Devices for the models of `rest` (each needing `extra` more), or None."""
    if not rest:
        return {}
    if not _may_fit(free, known.units[len(rest)], known.needs[len(rest)]):
        return None
    if known.steps is not None:
        known.steps.left -= 1
        if known.steps.left < 0:
            raise _OutOfSteps
    state = known.state(free, len(rest))
    if state in known.failed:
        return None
    name, footprint, extra = rest[0]
    usable = [d for d, amount in enumerate(free) if d not in footprint.pinned and amount >= footprint.vram]
    usable.sort(key=lambda d: -free[d])  # the emptiest first, as containers will be placed
    tried: set[tuple[object, ...]] = set()
    for devices in combinations(usable, extra):
        choice = known.choice(free, devices)
        if choice in tried:
            continue
        tried.add(choice)
        for device in devices:
            free[device] -= footprint.vram
        found = _search(free, rest[1:], known)
        for device in devices:
            free[device] += footprint.vram
        if found is not None:
            return {name: devices, **found}
    known.failed.add(state)
    return None


def check(
    capacities: Sequence[int], footprints: Mapping[str, Footprint], program: Program | None = None
) -> FitReport:
    """Every model that cannot fit alone, then every combination of every set of `program`
    that cannot fit, in the matrix's own expansion order. Models without a footprint (no
    GPU, or memory unknown) count as holding nothing. A combination holding a model that
    cannot fit alone is left out: that model's own misfit says it already."""
    total = sum(capacities)
    misfits = [
        Misfit(None, (name,), need({name: f}), total)
        for name, f in footprints.items()
        if place(capacities, {name: f}) is None
    ]
    alone = {m.combination[0] for m in misfits}
    unchecked: list[str] = []
    known: dict[frozenset[str], bool] = {}
    for index, matrix_set in enumerate(program.sets if program else ()):
        assert program is not None
        if combinations_count(matrix_set.root) > MAX_CHECKED:
            unchecked.append(matrix_set.name)
            continue
        seen: set[frozenset[str]] = set()
        for combination in expand_set(program, index):
            held = frozenset(m for m in combination if m in footprints)
            if combination in seen or len(held) < 2 or held & alone:
                continue
            seen.add(combination)
            if held not in known:
                known[held] = place(capacities, {m: footprints[m] for m in sorted(held)}) is not None
            if not known[held]:
                used = {m: footprints[m] for m in held}
                misfits.append(Misfit(matrix_set.name, tuple(sorted(combination)), need(used), total))
    return FitReport(tuple(misfits), tuple(unchecked))


@dataclass(frozen=True)
class DeviceUse:
    """One GPU under a placement: its memory `used` of `total`, and by which models."""

    index: int
    used: int
    total: int
    models: tuple[str, ...]


def use(
    capacities: Sequence[int],
    footprints: Mapping[str, Footprint],
    models: Sequence[str],
    placed: Mapping[str, Sequence[int]] | None = None,
) -> tuple[DeviceUse, ...] | None:
    """Each GPU's memory when `models` run, under a placement that fits, those of `placed`
    on their devices (None: none does); models without a footprint hold nothing."""
    footprints = pinned(footprints, placed or {})
    held = {m: footprints[m] for m in sorted(models) if m in footprints}
    placement = place(capacities, held)
    if placement is None:
        return None
    return tuple(
        DeviceUse(
            index,
            sum(held[m].vram for m, devices in placement.items() if index in devices),
            total,
            tuple(m for m, devices in placement.items() if index in devices),
        )
        for index, total in enumerate(capacities)
    )
