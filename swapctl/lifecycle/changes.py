"""PURE: what a reload changes, as a value, and the keys a running proxy cannot change.

A reload is planned like a swap: the swapper compares the new config with the old one and
with what runs, then applies the result at once (see `Swapper.reload`). `Changes` is that
result, for the log line and the answer to `POST /reload`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from swapctl.config import Config

# Config attributes (and their keys in the file) fixed while `up` serves: the instance names
# the containers, the listen address is bound, and the Guard was built with the keys, origins
# and Host names. A reload keeps their old values and says so; a restart applies them.
FIXED = {
    "instance": "instance",
    "listen": "listen",
    "api_keys": "apiKeys",
    "cors": "cors",
    "allowed_hosts": "allowedHosts",
}


@dataclass(frozen=True)
class Changes:
    """Model IDs by what a reload does to them, and the keys it could not apply."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()  # stopping once their requests finish, then gone
    replaced: tuple[str, ...] = ()  # their container spec or image changed: the next start is new
    unchanged: tuple[str, ...] = ()  # running ones keep running untouched
    forbidden: tuple[str, ...] = ()  # running, but not allowed beside the rest by the new policy
    needs_restart: tuple[str, ...] = ()  # keys (as in the file) whose old value is kept

    def summary(self) -> str:
        """One log line: added, removed, replaced, unchanged, and what else happened."""
        parts = [
            f"added: {_names(self.added)}",
            f"removed: {_names(self.removed)}",
            f"replaced: {_names(self.replaced)}",
            f"unchanged: {len(self.unchanged)}",
        ]
        if self.forbidden:
            parts.append(f"stopping (the new policy forbids them beside the rest): {_names(self.forbidden)}")
        if self.needs_restart:
            parts.append(f"not applied until swapctl up restarts: {_names(self.needs_restart)}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, list[str]]:
        return {key: list(value) for key, value in self.__dict__.items()}


def _names(models: tuple[str, ...]) -> str:
    return ", ".join(models) or "-"


def keep_fixed(old: Config, new: Config) -> tuple[Config, tuple[str, ...]]:
    """`new` with the old value of every FIXED key, and the keys (file names) whose value the
    new file changed."""
    changed = tuple(key for attr, key in FIXED.items() if getattr(old, attr) != getattr(new, attr))
    kept = replace(new, **{attr: getattr(old, attr) for attr in FIXED})
    return kept, changed


# What the admin route calls: read the file again and apply it; `why` goes to the log.
Reload = Callable[[str], Awaitable[Changes]]
