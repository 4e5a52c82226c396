"""The lifecycle of model containers: each model's state and how far its start has come
(`slot`), a request's hold on a model (`lease`: a ticket, then a lease once it is ready),
waiting for health (`health`), the swapper that decides with the policy and applies its
decisions through the backend (`swapper`), and reloading the config while serving: what a
reload changes (`changes`) and when it reads the file (`reloader`). What people watch (the
last swaps, request rates, and events for subscribers) is recorded in `activity`; what the
container engine shows of it while no proxy answers is read in `observed`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from swapctl.lifecycle.activity import Activity, Event, Rates, Row, Subscription, Swap
    from swapctl.lifecycle.changes import Changes, Reload
    from swapctl.lifecycle.fleet import Fleet
    from swapctl.lifecycle.lease import Lease, Ticket
    from swapctl.lifecycle.reloader import Reloader
    from swapctl.lifecycle.slot import ModelStatus, Progress, Slot, State, Step
    from swapctl.lifecycle.swapper import Swapper

# Each name loads its module when first asked for: `swapctl status` reads the engine through
# `observed` without paying for the swapper, the reloader and what they import.
_HOMES = {
    **dict.fromkeys(("Activity", "Event", "Rates", "Row", "Subscription", "Swap"), "activity"),
    **dict.fromkeys(("Changes", "Reload"), "changes"),
    "Fleet": "fleet",
    **dict.fromkeys(("Lease", "Ticket"), "lease"),
    "Reloader": "reloader",
    **dict.fromkeys(("ModelStatus", "Progress", "Slot", "State", "Step"), "slot"),
    "Swapper": "swapper",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


__all__ = [
    "Activity",
    "Changes",
    "Event",
    "Fleet",
    "Lease",
    "ModelStatus",
    "Progress",
    "Rates",
    "Reload",
    "Reloader",
    "Row",
    "Slot",
    "State",
    "Step",
    "Subscription",
    "Swap",
    "Swapper",
    "Ticket",
]
