"""Live state over the fake backend: the activity record (swaps, rates, subscribers), the
routes that read it (/events, /logs/stream, /logs/<model>/stream, /plan, /load), and
`swapctl status --watch`.

Streams are read from a real uvicorn server in this process (an in-process HTTP transport
buffers whole bodies, and these never end on their own); its socket is bound and listening
before it serves, so clients connect at once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from rich.console import Console
from support import FakeStack

from swapctl import cli, watch
from swapctl.backend.fake import FakeBackend, FakeModel
from swapctl.config import parse_config
from swapctl.errors import StartError
from swapctl.lifecycle import Activity, Event, Subscription
from swapctl.proxy.admin import sse_frames
from swapctl.server import build_server

pytestmark = pytest.mark.anyio
KEY = "live-key"
CONFIG: dict[str, Any] = {
    "instance": "live",
    "models": {
        "chat": {"image": "img", "aliases": ["gpt-4o-mini"]},
        "code": {"image": "img"},
        "big": {"image": "img"},
        "broken": {"image": "img"},
    },
    "matrix": {
        "vars": {"c": "chat", "k": "code", "B": "big"},
        "evict_costs": {"c": 2, "k": 3},
        "sets": {"pair": "c & k", "alone": "B"},
    },
}
ROW = {
    "model",
    "state",
    "container",
    "host_port",
    "in_flight",
    "ready_seconds",
    "idle_seconds",
    "gpu_memory",
    "gpus",
    "last_start_seconds",
    "requests",
    "requests_per_s",
    "tokens_per_s",
}
SWAP = {"at", "model", "set", "evicted", "cost", "seconds", "ok", "error"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Harness(FakeStack):
    def __init__(self, config: dict[str, Any] = CONFIG) -> None:
        backend = FakeBackend()
        backend.behaviour["broken"] = FakeModel(exit_at_start="fatal: no such file /models/x.gguf")
        super().__init__(config, backend, preload=False)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    found = Harness()
    yield found
    await found.close()


class Server:
    """The app under a real uvicorn server on 127.0.0.1, shut down as `swapctl up` is."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        closing = harness.swapper.activity.close
        self.server = build_server(harness.app, "127.0.0.1", 0, verbose=False, closing=closing)
        self.task: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Shut down as on Ctrl-C, and wait until the server has."""
        self.server.should_exit = True
        if self.task is not None:
            await self.task


@contextlib.asynccontextmanager
async def serving(harness: Harness) -> AsyncIterator[Server]:
    server = Server(harness)
    server.task = asyncio.create_task(server.server.serve(sockets=[server.socket]))
    try:
        yield server
    finally:
        await server.stop()
        server.socket.close()


async def next_event(subscription: Subscription, name: str) -> Event:
    """The next event called `name`, skipping the others."""
    async for event in subscription:
        if event.name == name:
            return event
    raise AssertionError(f"the subscription ended before a {name!r} event")


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, Any]]:
    """(name, data) of each Server-Sent Event in a stream's lines."""
    name, data = "", ""
    async for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif not line and name:
            yield name, json.loads(data)
            name = ""


# --- the record -------------------------------------------------------------------------------


async def test_a_swap_is_recorded_and_sent_with_what_it_evicted_and_cost(harness: Harness) -> None:
    await harness.use("chat")
    await harness.use("code")
    with harness.swapper.activity.subscribe() as subscription:
        await harness.use("big")
        swap = (await next_event(subscription, "swap")).data
    assert set(swap) == SWAP
    assert (swap["model"], swap["set"], swap["evicted"], swap["cost"], swap["ok"]) == (
        "big",
        "alone",
        ["chat", "code"],
        5,
        True,
    )
    history = harness.swapper.activity.history()
    assert [s["model"] for s in history] == ["chat", "code", "big"]  # oldest first
    assert history[-1] == swap
    assert harness.swapper.row("big")["last_start_seconds"] == swap["seconds"]  # type: ignore[index]


async def test_each_change_of_state_sends_the_models_row(harness: Harness) -> None:
    with harness.swapper.activity.subscribe({"model"}) as subscription:
        await harness.use("chat")
        states = []
        while "ready" not in states:
            row = (await next_event(subscription, "model")).data
            assert set(row) == ROW
            assert row["model"] == "chat"
            states.append(row["state"])
    assert states[0] == "pulling"  # its image looked for (a first start), then decided
    assert states.index("starting") < states.index("ready")


async def test_a_failed_start_is_recorded_with_its_error(harness: Harness) -> None:
    with pytest.raises(StartError):
        await harness.use("broken")
    swap = harness.swapper.activity.history()[-1]
    assert (swap["model"], swap["ok"]) == ("broken", False)
    assert "no such file /models/x.gguf" in swap["error"]


async def test_a_reload_is_sent_as_its_changes(harness: Harness) -> None:
    changed = {**CONFIG, "models": {**CONFIG["models"], "new": {"image": "img"}}}
    with harness.swapper.activity.subscribe({"reload", "model"}) as subscription:
        await harness.swapper.reload(parse_config(changed))
        reload = await next_event(subscription, "reload")
        added = await next_event(subscription, "model")
    assert reload.data["added"] == ["new"]
    assert (added.data["model"], added.data["state"]) == ("new", "stopped")


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rates_over_the_window_and_total_requests() -> None:
    clock = ManualClock()
    activity = Activity(lambda model: None, clock, window=10.0)
    for tokens in (10, 20, None, 30):
        activity.served("chat", 200, 0.5, tokens)
        clock.now += 1
    activity.served("chat", 500, 0.1, None)
    rates = activity.rates("chat")
    assert (rates.requests_per_s, rates.tokens_per_s, rates.requests) == (0.5, 6.0, 5)
    clock.now += 9.5  # the first requests leave the window; the total stays
    assert activity.rates("chat").to_json() == {"requests_per_s": 0.1, "tokens_per_s": 0.0, "requests": 5}
    assert activity.rates("never").requests == 0
    assert activity.stats() == {"models": {"chat": activity.rates("chat").to_json()}}


async def test_stats_go_out_while_someone_subscribes_with_the_rows_changed_in_flight() -> None:
    clock = ManualClock()
    rows = {"chat": {"model": "chat", "in_flight": 1}}
    activity = Activity(rows.get, clock, stats_every=0.01)
    activity.served("chat", 200, 0.2, 40)
    activity.touched("chat")  # nobody subscribes: nothing is kept
    with activity.subscribe() as subscription:
        activity.touched("chat")
        first = await anext(subscription)
        second = await anext(subscription)
    assert (first.name, first.data) == ("model", rows["chat"])
    assert second.name == "stats"
    assert second.data == {"models": {"chat": {"requests_per_s": 0.1, "tokens_per_s": 4.0, "requests": 1}}}
    assert activity.subscriptions == set()


async def test_a_subscriber_that_falls_behind_is_dropped_and_holds_nobody_up() -> None:
    activity = Activity(lambda model: None, backlog=3)
    slow = activity.subscribe({"log"})
    with activity.subscribe({"log"}) as quick:
        for number in range(5):
            activity.logged(f"line {number}")  # returns at once, whoever reads or not
            assert (await anext(quick)).data == {"line": f"line {number}"}
        assert slow.dropped and not quick.dropped
        assert [event async for event in slow] == []  # its stream ends; what it missed is gone
        assert activity.subscriptions == {quick}


async def test_closing_ends_subscriptions_after_what_is_queued() -> None:
    activity = Activity(lambda model: None)
    subscription = activity.subscribe({"log"})
    activity.logged("last words")
    closed: list[str] = []
    with activity.until_closed(lambda: closed.append("stream")):
        activity.close()
    assert [event.data async for event in subscription] == [{"line": "last words"}]
    assert closed == ["stream"]
    assert [event async for event in activity.subscribe()] == []  # a latecomer ends at once


async def test_event_frames_and_keep_alive_comments() -> None:
    activity = Activity(lambda model: None, stats_every=3600)
    frames: list[bytes] = []
    with activity.subscribe({"log"}) as subscription:
        stream = sse_frames(subscription, keep_alive=0.01)
        frames.append(await anext(stream))  # nothing happens: a comment
        activity.logged("hello")
        while len(frames) < 2 or frames[-1].startswith(b":"):
            frames.append(await anext(stream))
    assert frames[0] == b": keep-alive\n\n"
    assert frames[-1] == b'event: log\ndata: {"line": "hello"}\n\n'


async def test_events_that_came_together_go_out_in_one_chunk_in_order() -> None:
    activity = Activity(lambda model: None, stats_every=3600)
    with activity.subscribe({"log"}) as subscription:
        stream = sse_frames(subscription, keep_alive=60)
        for line in ("one", "two", "three"):
            activity.logged(line)
        chunk = await anext(stream)
        activity.logged("four")
        later = await anext(stream)
    assert chunk == b"".join(
        f'event: log\ndata: {{"line": "{line}"}}\n\n'.encode() for line in ("one", "two", "three")
    )
    assert later == b'event: log\ndata: {"line": "four"}\n\n'


# --- the routes -------------------------------------------------------------------------------


async def test_events_start_with_a_snapshot_then_follow(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swapctl")  # as `swapctl up` logs
    await harness.use("chat")
    logging.getLogger("swapctl").info("before the stream")
    async with (
        serving(harness) as server,
        httpx.AsyncClient(timeout=30) as client,
        client.stream("GET", f"{server.url}/events") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        events = sse_events(response.aiter_lines())
        name, snapshot = await anext(events)
        assert name == "snapshot"
        assert set(snapshot) == {"models", "swaps", "logs", "version"}
        assert [row["model"] for row in snapshot["models"]] == ["chat", "code", "big", "broken"]
        assert all(set(row) == ROW for row in snapshot["models"])
        assert snapshot["models"][0]["state"] == "ready"
        assert [swap["model"] for swap in snapshot["swaps"]] == ["chat"]
        assert len(snapshot["logs"]) <= 100
        await harness.use("big")
        seen = [(name, data) async for name, data in _until(events, "swap")]
        assert seen[-1][1]["evicted"] == ["chat"]
        assert any(data["line"].endswith("stopped chat") for name, data in seen if name == "log")
        rows = [(data["model"], data["state"]) for name, data in seen if name == "model"]
        assert rows[-1] == ("big", "ready")


async def _until(events: AsyncIterator[tuple[str, Any]], last: str) -> AsyncIterator[tuple[str, Any]]:
    async for name, data in events:
        yield name, data
        if name == last:
            return


async def test_proxy_log_stream_sends_recent_lines_then_new_ones(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="swapctl")
    log = logging.getLogger("swapctl")
    async with serving(harness) as server, httpx.AsyncClient(timeout=30) as client:
        await client.get(f"{server.url}/health")  # answered once the app has started, and keeps lines
        log.info("logged before connecting")
        async with client.stream("GET", f"{server.url}/logs/stream") as response:
            assert response.headers["content-type"] == "text/plain; charset=utf-8"
            lines = response.aiter_lines()
            assert (await anext(lines)).endswith("logged before connecting")
            log.info("logged after connecting")
            async for line in lines:
                if line.endswith("logged after connecting"):
                    break


def follower_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("swapctl-follow-")]


async def test_a_models_log_is_followed_until_the_client_leaves(harness: Harness) -> None:
    assert_openai_error(await harness.client.get("/logs/code/stream"), 409, "model 'code' is not running")
    await harness.use("chat")
    harness.backend.write_log("chat", "loaded the weights")
    async with serving(harness) as server, httpx.AsyncClient(timeout=30) as client:
        async with client.stream("GET", f"{server.url}/logs/gpt-4o-mini/stream") as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            assert await anext(lines) == "loaded the weights"
            harness.backend.write_log("chat", "request: POST /v1/chat/completions")
            assert await anext(lines) == "request: POST /v1/chat/completions"
            (thread,) = follower_threads()
        await asyncio.to_thread(thread.join, 10)  # the client left: the follow ends
        assert not thread.is_alive()


async def test_shutting_down_ends_open_streams(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    await harness.use("chat")
    async with (
        serving(harness) as server,
        httpx.AsyncClient(timeout=30) as client,
        client.stream("GET", f"{server.url}/events") as events,
        client.stream("GET", f"{server.url}/logs/chat/stream") as followed,
        client.stream("GET", f"{server.url}/logs/stream") as proxy_log,
    ):
        assert [r.status_code for r in (events, followed, proxy_log)] == [200, 200, 200]
        (thread,) = follower_threads()
        await server.stop()
        for response in (events, followed, proxy_log):
            await response.aread()  # each ends whole: no error
    await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
    assert "timeout graceful shutdown exceeded" not in caplog.text


def assert_openai_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"]


async def test_plan_previews_what_a_request_would_do(harness: Harness) -> None:
    await harness.use("chat")
    await harness.use("code")
    plan = (await harness.client.get("/plan/big")).json()
    assert plan == {"model": "big", "running": False, "set": "alone", "evict": ["chat", "code"], "cost": 5}
    plan = (await harness.client.get("/plan/gpt-4o-mini")).json()
    assert plan == {"model": "chat", "running": True, "set": None, "evict": [], "cost": 0}
    assert harness.backend.running_models() == {"chat", "code"}  # nothing changed
    assert_openai_error(await harness.client.get("/plan/nope"), 404, "unknown model 'nope'")


async def test_load_starts_a_model_and_answers_its_row(harness: Harness) -> None:
    response = await harness.client.post("/load/code")
    assert response.status_code == 200
    row = response.json()
    assert set(row) == ROW
    assert (row["model"], row["state"], row["in_flight"]) == ("code", "ready", 0)
    assert row["last_start_seconds"] is not None
    assert harness.backend.running_models() == {"code"}
    assert_openai_error(await harness.client.post("/load/broken"), 502, "'broken'", "no such file")
    assert_openai_error(await harness.client.post("/load/nope"), 404, "unknown model 'nope'")
    assert (await harness.client.get("/load/big")).status_code >= 400  # never GET: a link starts nothing
    assert harness.backend.running_models() == set()


async def test_the_live_routes_need_the_key_when_there_are_keys() -> None:
    harness = Harness({**CONFIG, "apiKeys": [KEY]})
    try:
        for method, path in [("GET", "/events"), ("POST", "/load/chat"), ("GET", "/plan/chat")]:
            response = await harness.client.request(method, path)
            assert_openai_error(response, 401)
        for path in ("/logs/stream", "/logs/chat/stream"):
            assert_openai_error(await harness.client.get(path), 401)
        keyed = {"authorization": f"Bearer {KEY}"}
        assert (await harness.client.post("/load/chat", headers=keyed)).json()["state"] == "ready"
        async with (
            serving(harness) as server,
            httpx.AsyncClient(timeout=30, headers=keyed) as client,
            client.stream("GET", f"{server.url}/events") as response,
        ):
            assert response.status_code == 200
            assert (await anext(sse_events(response.aiter_lines())))[0] == "snapshot"
    finally:
        await harness.close()


# --- swapctl status --watch -------------------------------------------------------------------


def test_read_events_parses_frames_and_skips_comments() -> None:
    lines = [": keep-alive", "", "event: model", 'data: {"model": "a",', 'data: "state": "ready"}', ""]
    lines += ["event: log", "data: not json", "", "data: [1]", ""]
    assert list(watch.read_events(lines)) == [("model", {"model": "a", "state": "ready"}), ("message", [1])]


def row(model: str, state: str, **fields: Any) -> dict[str, Any]:
    base = dict.fromkeys(ROW) | {"model": model, "state": state, "in_flight": 0, "requests": 0}
    return base | fields


def rendered(board: watch.Board, now: float) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(board.table("live", now))
    assert isinstance(console.file, io.StringIO)
    return console.file.getvalue()


def test_the_board_keeps_what_the_events_said() -> None:
    board = watch.Board()
    ready = row("a", "ready", container="box-a", host_port=40001, ready_seconds=60.0, idle_seconds=5.0)
    snapshot = {"models": [ready, row("b", "stopped"), row("gone", "stopped")], "swaps": [], "logs": []}
    board.apply("snapshot", snapshot, now=0.0)
    board.apply("model", row("b", "starting", last_start_seconds=2.5), now=1.0)
    board.apply("stats", {"models": {"a": {"requests_per_s": 1.5, "tokens_per_s": 42.0, "requests": 7}}}, 1.0)
    board.apply("model", row("gone", "removed"), now=1.0)
    swap = {"at": 0.0, "model": "b", "set": "s", "evicted": ["c"], "cost": 3, "seconds": 2.5, "ok": True}
    board.apply("swap", swap | {"error": None}, now=2.0)
    board.apply("log", {"line": "x"}, now=2.0)
    text = rendered(board, now=15.0)
    assert "gone" not in text
    a_line = next(line for line in text.splitlines() if "box-a" in line)
    assert "1m15s" in a_line and "0m20s" in a_line  # uptime and idle time go on counting
    assert "1.50" in a_line and "42.0" in a_line and " 7 " in a_line
    b_line = next(line for line in text.splitlines() if line.startswith("│ b "))
    assert "starting" in b_line and "2.5s" in b_line
    assert "b in set s ready in 2.5s, stopped c (cost 3)" in text
    board.apply("swap", swap | {"ok": False, "error": "model 'b' failed to start: boom"}, now=3.0)
    assert "b failed after 2.5s: model 'b' failed to start: boom" in rendered(board, 3.0)


def test_the_board_is_drawn_again_on_each_event() -> None:
    board, drawn = watch.Board(), []
    events = [("snapshot", {"models": [row("a", "stopped")]}), ("model", row("a", "ready"))]

    def render(now: float) -> Any:
        drawn.append(board.rows["a"]["state"])
        return board.table("live", now)

    watch.draw(board, events, render, Console(file=io.StringIO()), clock=lambda: 0.0)
    assert drawn == ["stopped", "ready"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        cli.main(list(argv), backend_factory=FakeBackend)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


async def test_status_watch_shows_the_proxy_live_and_ends_when_it_goes(
    harness: Harness, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the width of a console that is not a terminal
    config = tmp_path / "swapctl.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    await harness.use("chat")
    await harness.use("code")
    subscribed = asyncio.Event()
    subscribe: Callable[..., Subscription] = harness.swapper.activity.subscribe

    def spy(*names: Any) -> Subscription:
        subscribed.set()
        return subscribe(*names)

    monkeypatch.setattr(harness.swapper.activity, "subscribe", spy)
    async with serving(harness) as server:
        watching = asyncio.create_task(
            asyncio.to_thread(run_cli, capsys, "status", "--watch", "-c", str(config), "--url", server.url)
        )
        await subscribed.wait()
    code, out, err = await watching
    assert code == 1
    assert err == f"error: the proxy at {server.url} went away (it ended the event stream)\n"
    assert "live from the proxy" in out
    assert "last swap" in out and "code in set pair ready in" in out
    ready = [line for line in out.splitlines() if "ready" in line and "│" in line]
    assert {line.split()[1] for line in ready} == {"chat", "code"}


def test_status_watch_ends_quietly_on_ctrl_c(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "swapctl.yaml"
    config.write_text(yaml.safe_dump(CONFIG))

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(watch, "watch", interrupted)
    assert run_cli(capsys, "status", "--watch", "-c", str(config)) == (0, "", "")


def test_status_watch_without_a_proxy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "swapctl.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{free.getsockname()[1]}"
    code, _, err = run_cli(capsys, "status", "--watch", "-c", str(config), "--url", url)
    assert (code, err) == (1, f"error: no swapctl up answers at {url}\n")
