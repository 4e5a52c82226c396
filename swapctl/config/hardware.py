"""PURE: a model's GPU footprint, from its `vram` and the GPUs its container asks for, and
the fit-mode policy (`matrix: {fit: gpu}`) built from them.

How many GPUs a model uses is what Docker would give it: `gpus:` (`all`, a count, device
IDs) or Compose's `deploy.resources.reservations.devices` with the `gpu` capability; no
request, no GPU. `all` is every declared GPU. A device ID that is an index (`"1"`) pins
that device; any other ID (a UUID) counts as one GPU, placed anywhere, since the declared
GPUs have no UUIDs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from swapctl.config.scalars import format_gpu_memory
from swapctl.config.service import DeviceRequest
from swapctl.errors import ConfigError
from swapctl.matrix.fit import MAX_CHECKED, DeviceUse, Footprint, Misfit, check, use
from swapctl.matrix.fit_solver import FitPolicy
from swapctl.matrix.program import EvictCosts, compile_costs
from swapctl.matrix.solver import MatrixPolicy
from swapctl.names import Names

if TYPE_CHECKING:
    from swapctl.config.resolved import Config, Model

GpuRequest = str | int | tuple[str, ...] | None  # a model's `gpus:`


def gpu_count(
    gpus: GpuRequest, requests: Sequence[DeviceRequest], devices: int
) -> tuple[int, tuple[int, ...]]:
    """(how many GPUs, the pinned device indexes) a model's container asks for, of `devices`."""
    asks: list[int | tuple[str, ...]] = [
        r.device_ids or r.count or -1 for r in requests if "gpu" in r.capabilities
    ]
    if gpus is not None:
        asks.append(-1 if gpus == "all" else gpus if isinstance(gpus, (int, tuple)) else -1)
    if -1 in asks:
        return devices, tuple(range(devices))
    ids = [device for ask in asks if isinstance(ask, tuple) for device in ask]
    pinned = tuple(sorted({int(device) for device in ids if device.isdigit()}))
    count = sum(ask for ask in asks if isinstance(ask, int)) + len(ids)
    return count, pinned


def footprint(
    vram: int | None, gpus: GpuRequest, requests: Sequence[DeviceRequest], devices: int
) -> Footprint | None:
    """The model's footprint on `devices` declared GPUs; None when it uses no GPU or its
    `vram` is unknown (then it is not checked)."""
    count, pinned = gpu_count(gpus, requests, devices)
    if vram is None or count == 0:
        return None
    return Footprint(vram, count, pinned)


def fit_policy(
    names: Names, models: Mapping[str, Model], evict_costs: EvictCosts, gpus: tuple[int, ...] | None
) -> FitPolicy:
    """`matrix: {fit: gpu}` on the declared GPUs. Where written sets leave a model of unknown
    memory unchecked (the sets are the user's promise), fit mode would have to guess it:
    holding nothing, it would start beside anything and die out of memory; filling its
    GPUs, it would evict everything for a guess. So the GPUs and the `vram` of every model
    that uses one are required, and a model that cannot fit even alone is refused here,
    not at its first request."""
    if not gpus:
        raise ConfigError(
            "matrix.fit", "fit: gpu places models on the declared GPUs: declare them in `hardware.gpus`"
        )
    footprints: dict[str, Footprint] = {}
    for model_id, model in models.items():
        count, pinned = gpu_count(model.gpus, model.device_requests, len(gpus))
        if count and model.vram is None:
            raise ConfigError(
                f"models.{model_id}.vram", "required with `matrix: {fit: gpu}` by every model that uses a GPU"
            )
        if count and model.vram is not None:
            footprints[model_id] = Footprint(model.vram, count, pinned)
    policy = FitPolicy(compile_costs(names, tuple(models), evict_costs), footprints, gpus)
    for model_id in footprints:
        if problem := policy.alone_problem(model_id):
            raise ConfigError(f"models.{model_id}.vram", problem)
    return policy


def _gpus_text(capacities: Sequence[int]) -> str:
    if not capacities:
        return "no GPUs declared"
    if len(set(capacities)) == 1:
        return f"{len(capacities)} GPU{'s' * (len(capacities) != 1)} of {format_gpu_memory(capacities[0])}"
    return "GPUs of " + ", ".join(format_gpu_memory(size) for size in capacities)


def _footprint_text(f: Footprint) -> str:
    size = format_gpu_memory(f.vram)
    if f.pinned and len(f.pinned) == f.count:
        where = ", ".join(map(str, f.pinned))
        return f"{size} on GPU {where}" if f.count == 1 else f"{size} on each of GPUs {where}"
    return size if f.count == 1 else f"{size} on each of {f.count} GPUs"


def misfit_line(misfit: Misfit, capacities: Sequence[int], footprints: Mapping[str, Footprint]) -> str:
    """One line for `swapctl validate`: the key path, the models, their need and the capacity."""
    held = [m for m in misfit.combination if m in footprints]
    needs = ", ".join(f"{m} {_footprint_text(footprints[m])}" for m in held)
    gpus = f"{_gpus_text(capacities)}, {format_gpu_memory(misfit.capacity)} in all"
    if misfit.set is None:
        alone = _footprint_text(footprints[held[0]])
        return f"models.{held[0]}.vram: {held[0]} cannot fit the GPUs even alone: it needs {alone}; {gpus}"
    return (
        f"matrix.sets.{misfit.set}: {' + '.join(misfit.combination)} cannot run together on the GPUs: "
        f"they need {format_gpu_memory(misfit.need)} ({needs}); {gpus}"
    )


def fit_problems(config: Config) -> tuple[list[str], list[str]]:
    """(errors, notes) of the matrix checked against the declared GPUs: one error per model
    or set combination that cannot fit, notes for what is not checked. Both empty unless
    `hardware` is declared and some model gives its `vram`."""
    capacities = config.gpu_memory
    if capacities is None or all(m.vram is None for m in config.models.values()):
        return [], []
    footprints = config.footprints
    program = config.policy.program if isinstance(config.policy, MatrixPolicy) else None
    report = check(capacities, footprints, program)
    errors = [misfit_line(misfit, capacities, footprints) for misfit in report.misfits]
    notes = []
    unknown = [name for name, m in config.models.items() if m.vram is None and _uses_gpu(m, len(capacities))]
    if unknown:
        notes.append(f"no vram for {', '.join(unknown)}: their GPU memory is not checked")
    idle = [name for name, m in config.models.items() if m.vram is not None and name not in footprints]
    if idle:
        notes.append(f"vram given but no GPU asked for (gpus: or deploy.resources): {', '.join(idle)}")
    if report.unchecked:
        notes.append(f"sets with over {MAX_CHECKED} combinations not checked: {', '.join(report.unchecked)}")
    return errors, notes


def footprint_notes(config: Config, measured: Mapping[str, Sequence[tuple[int, int]]]) -> list[str]:
    """Notes for `swapctl validate` from the footprints last measured (model -> (device index,
    bytes)): a model that held more than its `vram` on some GPU, and one that uses a GPU
    without `vram`, with the measured value as a suggestion."""
    notes = []
    for name, memory in measured.items():
        model = config.models.get(name)
        if model is None or not memory:
            continue
        if model.vram is None:
            held = ", ".join(f"{_measured_text(size)} on GPU {index}" for index, size in memory)
            most = _measured_text(max(size for _, size in memory)).replace(" ", "")
            notes.append(
                f"models.{name}.vram: not set; {name} held {held} when last measured: vram: {most} would declare it"
            )
            continue
        over = [(index, size) for index, size in memory if size > model.vram]
        if over:
            held = ", ".join(f"{_measured_text(size)} on GPU {index}" for index, size in over)
            notes.append(
                f"models.{name}.vram: {name} held {held} when last measured, "
                f"over its vram of {format_gpu_memory(model.vram)}"
            )
    return notes


def _measured_text(size: int) -> str:
    """A measured size rounded up, as a person reads it: `19.1 GiB`, `512 MiB`."""
    if size >= 2**30:
        tenths = math.ceil(size * 10 / 2**30)
        return f"{tenths // 10} GiB" if tenths % 10 == 0 else f"{tenths / 10:.1f} GiB"
    return f"{max(1, math.ceil(size / 2**20))} MiB"


def _uses_gpu(model: Model, devices: int) -> bool:
    return gpu_count(model.gpus, model.device_requests, devices)[0] > 0


def memory_use(
    config: Config, models: Sequence[str], placed: Mapping[str, Sequence[int]] | None = None
) -> tuple[DeviceUse, ...] | None:
    """Each declared GPU's memory when `models` run, those of `placed` on their devices (None:
    they do not fit); models without a known footprint count as holding nothing."""
    return use(config.gpu_memory or (), config.footprints, models, placed)


def shows_memory(config: Config) -> bool:
    """Whether GPU memory can be shown: GPUs declared and some model's vram given."""
    return config.gpu_memory is not None and bool(config.footprints)


def use_text(devices: tuple[DeviceUse, ...] | None, index: int) -> str:
    """`18 GiB / 24 GiB (a, b)` for device `index`, or `does not fit`."""
    if devices is None:
        return "does not fit"
    device = devices[index]
    names = f" ({', '.join(device.models)})" if device.models else ""
    return f"{format_gpu_memory(device.used)} / {format_gpu_memory(device.total)}{names}"


def use_json(devices: tuple[DeviceUse, ...] | None) -> list[dict[str, object]] | None:
    if devices is None:
        return None
    return [{"index": d.index, "used": d.used, "total": d.total, "models": list(d.models)} for d in devices]
