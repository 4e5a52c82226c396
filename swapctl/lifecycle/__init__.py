"""The lifecycle of model containers: each model's state (`slot`), a request's hold on a
ready model (`lease`), waiting for health (`health`), the swapper that decides with the
policy and applies its decisions through the backend (`swapper`), and reloading the config
while serving: what a reload changes (`changes`) and when it reads the file (`reloader`)."""

from swapctl.lifecycle.changes import Changes, Reload
from swapctl.lifecycle.lease import Lease
from swapctl.lifecycle.reloader import Reloader
from swapctl.lifecycle.slot import ModelStatus, Slot, State
from swapctl.lifecycle.swapper import Swapper

__all__ = ["Changes", "Lease", "ModelStatus", "Reload", "Reloader", "Slot", "State", "Swapper"]
