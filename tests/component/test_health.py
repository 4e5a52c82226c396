"""Component tests: the health wait over the fake backend, and what a failed start reports."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from swapctl.backend.aio import AsyncBackend
from swapctl.backend.fake import FakeBackend, FakeModel
from swapctl.config import parse_config
from swapctl.errors import StartError
from swapctl.lifecycle.health import Clock, HealthCheck
from swapctl.spec import build_spec

CONFIG = parse_config({"models": {"chat": {"image": "img"}}})

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def failed_start(*log: str) -> StartError:
    """The StartError of a container that wrote `log` and exited at once."""
    backend = FakeBackend()
    backend.behaviour["chat"] = FakeModel(exit_at_start=log[0])
    container = backend.start(build_spec(CONFIG, "chat"))
    backend.boxes[container.id].log.extend(log[1:])
    async with httpx.AsyncClient(transport=backend.transport) as client:
        health = HealthCheck(AsyncBackend(backend), client, Clock(lambda: 0.0, asyncio.sleep))
        with pytest.raises(StartError) as caught:
            await health.wait("chat", container, "/health", 60)
    return caught.value


async def test_a_failed_start_quotes_the_log_one_line_each() -> None:
    error = await failed_start("loading", "error: model file not found")
    assert str(error).endswith("last log lines:\n  | loading\n  | error: model file not found")


async def test_the_containers_log_cannot_forge_lines_of_the_proxys_own() -> None:
    forged = "INFO swapctl: model 'chat' is ready"
    error = await failed_start(f"fatal\r{forged}", f"\x1b[2K{forged}\u2028{forged}", "done")
    lines = str(error).split("\n")
    assert all(line.startswith("  | ") for line in lines[1:]), lines
    assert not any(character in str(error) for character in "\r\x1b\u2028")
    assert "  | fatal\\r" + forged in lines
    assert "  | \\x1b[2K" + forged + "\\u2028" + forged in lines


async def test_the_quoted_log_is_capped_in_length() -> None:
    error = await failed_start("x" * 1_000_000, *["y" * 1000] * 19)
    assert len(str(error)) < 4000
    assert str(error).split("\n")[-1].endswith("[cut]")
