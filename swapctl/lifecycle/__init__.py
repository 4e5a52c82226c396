"""The lifecycle of model containers: each model's state and how far its start has come
(`slot`), a request's hold on a model (`lease`: a ticket, then a lease once it is ready),
waiting for health (`health`), the swapper that decides with the policy and applies its
decisions through the backend (`swapper`), and reloading the config while serving: what a
reload changes (`changes`) and when it reads the file (`reloader`). What people watch (the
last swaps, request rates, and events for subscribers) is recorded in `activity`; what the
container engine shows of it while no proxy answers is read in `observed`."""

from swapctl.lifecycle.activity import Activity, Event, Rates, Row, Subscription, Swap
from swapctl.lifecycle.changes import Changes, Reload
from swapctl.lifecycle.lease import Lease, Ticket
from swapctl.lifecycle.reloader import Reloader
from swapctl.lifecycle.slot import ModelStatus, Progress, Slot, State, Step
from swapctl.lifecycle.swapper import Swapper

__all__ = [
    "Activity",
    "Changes",
    "Event",
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
