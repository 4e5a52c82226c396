"""Component tests: a container's log followed on the event loop, over the fake backend. A
reader that falls behind is dropped (its stream ends with a note) before its unread lines
pass a bound in lines or bytes; one that keeps up is never dropped."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from swapctl.backend import Container
from swapctl.backend.aio import AsyncBackend, AsyncLogFollow
from swapctl.backend.fake import FakeBackend
from swapctl.config import parse_config
from swapctl.spec import build_spec

pytestmark = pytest.mark.anyio
CONFIG = parse_config({"models": {"chat": {"image": "img"}}})
LINE = "x" * 16 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def running() -> AsyncIterator[tuple[FakeBackend, Container]]:
    backend = FakeBackend()
    container = backend.start(build_spec(CONFIG, "chat"))
    yield backend, container
    backend.stop(container.id, 0)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def reading(container: Container) -> bool:
    """Whether a thread still follows the container's log."""
    return any(thread.name == f"swapctl-follow-{container.id}" for thread in threading.enumerate())


async def unread(following: AsyncLogFollow) -> list[str]:
    return [line async for line in following]


async def test_a_reader_that_leaves_megabytes_unread_is_dropped_with_a_note(
    running: tuple[FakeBackend, Container],
) -> None:
    backend, container = running
    following = AsyncBackend(backend).follow(container.id)
    for _ in range(200):  # 3.2 MiB
        backend.write_log("chat", LINE)
    await until(lambda: not reading(container), "the follow to end")
    lines = await asyncio.wait_for(unread(following), 5)
    assert lines[:-1] == [LINE] * (len(lines) - 1)
    assert 16 * 1024 * (len(lines) - 1) <= 1024 * 1024
    assert "fell behind" in lines[-1] and "dropped" in lines[-1]


async def test_a_reader_that_leaves_ten_thousand_lines_unread_is_dropped_with_a_note(
    running: tuple[FakeBackend, Container],
) -> None:
    backend, container = running
    following = AsyncBackend(backend).follow(container.id)
    for number in range(10_050):
        backend.write_log("chat", f"line {number}")
    await until(lambda: not reading(container), "the follow to end")
    lines = await asyncio.wait_for(unread(following), 5)
    assert lines[:-1] == [f"line {number}" for number in range(10_000)]
    assert "fell behind" in lines[-1]


async def test_a_reader_that_keeps_up_is_never_dropped(running: tuple[FakeBackend, Container]) -> None:
    backend, container = running
    following = AsyncBackend(backend).follow(container.id)
    for number in range(20):  # 6.4 MB in all, 320 kB at a time
        for _ in range(20):
            backend.write_log("chat", f"{number:2} {LINE[:16_000]}")
        got = [await asyncio.wait_for(anext(following), 5) for _ in range(20)]
        assert got == [f"{number:2} {LINE[:16_000]}"] * 20
    backend.stop(container.id, 0)
    assert await asyncio.wait_for(unread(following), 5) == []
