"""One `swapctl up` per instance.

Two proxies driving the same containers would each decide alone, and together run pairs
the matrix forbids. `up` holds an advisory lock on a small file in the user's state
directory for as long as it runs (the kernel drops it when the process ends, however it
ends) and writes its address there, so that `status`, `unload` and `down` find it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from swapctl.errors import SwapctlError


class InstanceTaken(SwapctlError):
    def __init__(self, instance: str, owner: Owner | None) -> None:
        by = f" by swapctl up at {owner.url} (pid {owner.pid})" if owner else " by another swapctl up"
        super().__init__(
            f"instance '{instance}' is already served{by}; stop it first, or give this config "
            "another `instance:`"
        )


@dataclass(frozen=True)
class Owner:
    url: str
    pid: int


def state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$SWAPCTL_STATE_DIR, else $XDG_STATE_HOME/swapctl, else ~/.local/state/swapctl."""
    if environ.get("SWAPCTL_STATE_DIR"):
        return Path(environ["SWAPCTL_STATE_DIR"])
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "swapctl"


def _lock_path(directory: Path, instance: str) -> Path:
    return directory / f"{instance}.lock"


def _read(fd: int) -> Owner | None:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        found = json.loads(os.read(fd, 4096) or b"null")
        return Owner(str(found["url"]), int(found["pid"]))
    except (ValueError, TypeError, KeyError):
        return None  # written a moment from now, or not by us


class Ownership:
    """Held while `up` serves the instance; released by `release()` or by the process ending."""

    def __init__(self, instance: str, url: str, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = _lock_path(directory, instance)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        for attempt in range(20):  # a `status` looking (a shared lock) holds it for a moment
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read(self.fd)
                if holder is not None or attempt == 19:
                    os.close(self.fd)
                    raise InstanceTaken(instance, holder) from None
                time.sleep(0.01)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps({"url": url, "pid": os.getpid()}).encode(), 0)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.close(self.fd)


def find_owner(instance: str, directory: Path) -> Owner | None:
    """The running `up` serving `instance`, or None."""
    try:
        fd = os.open(_lock_path(directory, instance), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd)  # held: someone serves it
    else:
        return None
    finally:
        os.close(fd)
