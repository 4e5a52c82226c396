"""Reading the config file again while `up` serves: on `POST /reload`, on SIGHUP, and with
`--watch-config` whenever the file, the `.env` beside it (its variables), or a template in
the `compose-templates/` beside it changes.

A file that does not parse is refused with its key-path error (logged, and raised to the
caller) and the old config keeps serving; one that does is handed to `Swapper.reload`.
Reloads run one at a time, so a save seen by the watcher and a SIGHUP sent with it apply in
turn, never interleaved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from swapctl.config import TEMPLATE_DIR, Config, load_config
from swapctl.config.envfile import DOTENV
from swapctl.errors import SwapctlError
from swapctl.lifecycle.changes import Changes
from swapctl.lifecycle.fleet import Fleet
from swapctl.lifecycle.swapper import Swapper

if TYPE_CHECKING:
    from watchfiles import Change

log = logging.getLogger("swapctl")
# watchfiles' grouping, in ms: changes are taken together until none came for STEP (an
# editor's save is a write and a rename), and for at most DEBOUNCE
DEBOUNCE, STEP = 1000, 200


class Reloader:
    def __init__(
        self, path: Path, swapper: Swapper | Fleet, load: Callable[[Path], Config] = load_config
    ) -> None:
        """`swapper`: the one a reload applies to, or the fleet of every host's."""
        self.path = path.resolve()
        self.templates = self.path.parent / TEMPLATE_DIR
        self.dotenv = self.path.parent / DOTENV
        self.swapper, self.load = swapper, load
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()

    async def reload(self, why: str) -> Changes:
        """Read the file and apply it; a SwapctlError (a ConfigError naming its key path)
        leaves the old config serving. `why` goes to the log."""
        async with self.lock:
            try:
                config = await asyncio.to_thread(self.load, self.path)
            except SwapctlError as error:
                log.error("reload (%s) refused, the old config keeps serving: %s", why, error)
                raise
            changes = await self.swapper.reload(config)
        # a key kept at its old value is worth a warning: the file no longer says what runs
        level = logging.WARNING if changes.needs_restart else logging.INFO
        log.log(level, "reload (%s): %s", why, changes.summary())
        return changes

    async def _reload_quietly(self, why: str) -> None:
        """A reload nobody waits for: its errors are in the log already."""
        with contextlib.suppress(SwapctlError):
            await self.reload(why)

    def spawn(self, why: str) -> None:
        """Reload in a task: a signal handler cannot wait for one."""
        task = asyncio.get_running_loop().create_task(self._reload_quietly(why))
        self.tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self.tasks.discard)

    def relevant(self, change: Change, path: str) -> bool:
        """The config file itself, its `.env`, or a template beside it (editors' temporary
        files are not)."""
        changed = Path(path)
        return changed in (self.path, self.dotenv) or (
            changed.parent == self.templates and changed.suffix == ".yaml"
        )

    async def watch(self, stop: asyncio.Event) -> None:
        """Reload on every change to the file or its templates until `stop` is set. Folders
        are watched, not the file: an editor that saves by renaming replaces the file."""
        from watchfiles import awatch

        folders = [folder for folder in (self.path.parent, self.templates) if folder.is_dir()]
        changes = awatch(
            *folders,
            watch_filter=self.relevant,
            debounce=DEBOUNCE,
            step=STEP,
            stop_event=stop,
            recursive=False,
        )
        try:
            async for _ in changes:
                await self._reload_quietly("the file changed")
        except Exception as error:  # the watcher's own failure (say, no inotify watches left)
            log.error(
                "--watch-config: cannot watch %s (%r); SIGHUP and POST /reload still reload", self.path, error
            )

    @contextlib.asynccontextmanager
    async def serving(self, watch: bool) -> AsyncIterator[None]:
        """While the block runs, SIGHUP reloads, and with `watch` so does a change of the file."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.spawn, "SIGHUP")
        stop = asyncio.Event()
        watcher = loop.create_task(self.watch(stop)) if watch else None
        if watch:
            log.info("watching %s for changes", self.path)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            stop.set()  # the watcher's thread sees it within one step, and the watch ends
            if watcher is not None:
                await watcher
