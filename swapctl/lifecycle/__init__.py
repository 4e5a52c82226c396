"""The lifecycle of model containers: each model's state (`slot`), a request's hold on a
ready model (`lease`), waiting for health (`health`), and the swapper that decides with the
policy and applies its decisions through the backend (`swapper`)."""

from swapctl.lifecycle.lease import Lease
from swapctl.lifecycle.slot import ModelStatus, Slot, State
from swapctl.lifecycle.swapper import Swapper

__all__ = ["Lease", "ModelStatus", "Slot", "State", "Swapper"]
