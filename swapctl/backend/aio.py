"""The backend's blocking calls, each run in a worker thread, so callers simply await.

A followed log is read in a thread of its own (never the default executor's: the wait for
its next line may be endless), and closed when its reader leaves, which ends that thread.
A reader that falls behind, leaving BACKLOG_LINES lines or BACKLOG_BYTES unread, is dropped:
its stream ends with a line saying so (it may follow again), and the engine's stream closes.
Both backends cut lines at `lines.LONGEST_LINE`, so a reader holds at most about BACKLOG_BYTES.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from swapctl.backend.base import Backend, Container, LogFollow
from swapctl.backend.progress import LayerReport, PullListener
from swapctl.errors import SwapctlError
from swapctl.spec import ContainerSpec

log = logging.getLogger("swapctl")
BACKLOG_LINES = 10_000  # lines a reader may leave unread before it is dropped
BACKLOG_BYTES = 1024 * 1024  # and their size, each line counted with LINE_COST more
LINE_COST = 64  # bytes a queued line costs besides its text: the str object, the queue's slot
DROPPED = "[swapctl: this reader fell behind the log ({} unread) and was dropped; follow it again]"


class AsyncBackend:
    def __init__(self, backend: Backend) -> None:
        self.sync = backend

    async def list(self, instance: str) -> list[Container]:
        return await asyncio.to_thread(self.sync.list, instance)

    async def start(self, spec: ContainerSpec) -> Container:
        return await asyncio.to_thread(self.sync.start, spec)

    async def get(self, container_id: str) -> Container | None:
        return await asyncio.to_thread(self.sync.get, container_id)

    async def stop(self, container_id: str, grace: float) -> None:
        await asyncio.to_thread(self.sync.stop, container_id, grace)

    async def image_id(self, image: str) -> str | None:
        return await asyncio.to_thread(self.sync.image_id, image)

    async def pull(self, image: str, on_progress: PullListener) -> None:
        """Pull `image` in a worker thread; `on_progress` is called on the event loop, each
        report before the pull's end is awaited."""
        loop = asyncio.get_running_loop()

        def report(report: LayerReport) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens
                loop.call_soon_threadsafe(on_progress, report)

        await asyncio.to_thread(self.sync.pull, image, report)

    async def logs(self, container_id: str, tail: int = 50) -> str:
        return await asyncio.to_thread(self.sync.logs, container_id, tail)

    async def ping(self) -> bool:
        return await asyncio.to_thread(self.sync.ping)

    def follow(self, container_id: str) -> AsyncLogFollow:
        """The container's log lines as they come (on the event loop); `close` it when done."""
        return AsyncLogFollow(self.sync, container_id)


class AsyncLogFollow:
    """A container's log followed in a thread; its lines handed to the event loop, to read as
    an async iterator, which ends when the container stops or `close` is called."""

    def __init__(
        self,
        backend: Backend,
        container_id: str,
        most_lines: int = BACKLOG_LINES,
        most_bytes: int = BACKLOG_BYTES,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()  # None: the end
        self.most_lines, self.most_bytes = most_lines, most_bytes
        self.unread = 0  # bytes of the lines queued, with LINE_COST each
        self.container_id = container_id
        self._ended = False  # the end is queued: later lines are not
        self._lock = threading.Lock()
        self._source: LogFollow | None = None
        self._closed = False
        name = f"swapctl-follow-{container_id[:12]}"
        threading.Thread(target=self._read, args=(backend, container_id), name=name, daemon=True).start()

    def _read(self, backend: Backend, container_id: str) -> None:
        try:
            source = backend.follow(container_id)
            with self._lock:
                self._source = source
                closed = self._closed
            if closed:  # closed while the engine was asked
                source.close()
                return
            for line in source:
                self._hand(line)
        except SwapctlError as error:
            log.warning("following the log of %s: %s", container_id[:12], error)
        finally:
            self._hand(None)

    def _hand(self, line: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody reads
            self.loop.call_soon_threadsafe(self._put, line)

    def _put(self, line: str | None) -> None:
        if self._ended:
            return
        if line is None:
            self._ended = True
        elif self.lines.qsize() >= self.most_lines or self.unread + len(line) + LINE_COST > self.most_bytes:
            self._drop()
            return
        else:
            self.unread += len(line) + LINE_COST
        self.lines.put_nowait(line)

    def _drop(self) -> None:
        """The reader fell behind: its stream ends (with a note) rather than keep buffering."""
        behind = f"{self.lines.qsize()} lines, {self.unread} bytes"
        log.info("a reader of the log of %s fell behind (%s unread): dropped", self.container_id[:12], behind)
        note = DROPPED.format(behind)
        self.unread += len(note) + LINE_COST
        self.lines.put_nowait(note)
        self.close()

    def __aiter__(self) -> AsyncLogFollow:
        return self

    async def __anext__(self) -> str:
        line = await self.lines.get()
        if line is None:
            self.lines.put_nowait(None)  # the end stays the end
            raise StopAsyncIteration
        self.unread -= len(line) + LINE_COST
        return line

    def close(self) -> None:
        """Stop following (on the event loop): the engine's stream closes, its thread ends,
        and a reader waiting for a line stops."""
        with self._lock:
            self._closed = True
            source = self._source
        if source is not None:
            source.close()
        self._put(None)
