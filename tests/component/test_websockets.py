"""Component tests: WebSockets through `/upstream/<model>/...` and `?model=`, the guard in front
of them, and the `/upstream/<model>` redirect.

The app runs under the real uvicorn server `up` builds, on 127.0.0.1, over the fake engine;
the models' servers need a real socket, so a fake container of a WebSocket model publishes
the port of a `websockets` echo server on 127.0.0.1 (its health check still goes through the
fake engine's transport, which finds the container by that port)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send
from support import FakeStack
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from swapctl.backend import Container
from swapctl.backend.fake import FakeBackend, FakeModel
from swapctl.lifecycle import State
from swapctl.proxy.guard import Guard
from swapctl.server import build_server
from swapctl.spec import ContainerSpec

pytestmark = pytest.mark.anyio
KEY = "sk-swapctl-ws-5e1d"
EVIL = "http://evil.example"
APP = "http://localhost:3000"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Seen:
    """What the echo server saw of one connection."""

    path: str
    headers: Headers
    subprotocol: str | None
    closed: tuple[int | None, str | None] | None = None  # the close code and reason it received


@dataclass
class Echo:
    """A WebSocket echo server on 127.0.0.1: it sends back each message as it came (text as
    text, bytes as bytes); `whoami` answers what it saw; `close CODE REASON` closes with them;
    `drop` cuts the connection without a close; a path under /refuse is answered 403."""

    server: Server | None = None
    seen: list[Seen] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(next(iter(self.server.sockets)).getsockname()[1])

    async def handle(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        seen = Seen(request.path, request.headers, ws.subprotocol)
        self.seen.append(seen)
        try:
            async for message in ws:
                await self.answer(ws, request, message)
        except ConnectionClosed:
            pass  # closed with a code other than 1000, or cut
        seen.closed = (ws.close_code, ws.close_reason)

    @staticmethod
    async def answer(ws: ServerConnection, request: Request, message: str | bytes) -> None:
        if message == "whoami":
            headers = [[name.lower(), value] for name, value in request.headers.raw_items()]
            await ws.send(json.dumps({"path": request.path, "headers": headers}))
        elif isinstance(message, str) and message.startswith("close "):
            _, code, said = message.split(" ", 2)
            await ws.close(int(code), said)
        elif message == "drop":
            ws.transport.abort()
        else:
            await ws.send(message)

    @staticmethod
    def refuse(ws: ServerConnection, request: Request) -> Response | None:
        return ws.respond(403, "not here\n") if request.path.startswith("/refuse") else None


def chat_if_offered(ws: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    return Subprotocol("chat") if "chat" in offered else None


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    found = Echo()
    async with serve(
        found.handle, "127.0.0.1", 0, process_request=found.refuse, select_subprotocol=chat_if_offered
    ) as server:
        found.server = server
        yield found


class EchoPorts(FakeBackend):
    """The fake engine, whose containers of the models in `ports` publish those ports."""

    def __init__(self, ports: dict[str, int]) -> None:
        super().__init__()
        self.ports = ports

    def start(self, spec: ContainerSpec) -> Container:
        container = super().start(spec)
        if spec.model not in self.ports:
            return container
        box = self.boxes[container.id]
        box.container = replace(container, host_port=self.ports[spec.model])
        return box.container


def config(**extra: Any) -> dict[str, Any]:
    """`echo` (alias `talk`) and `other`, one at a time (no matrix); `slow` never gets ready."""
    return {
        "instance": "ws",
        "models": {
            "echo": {"image": "img", "aliases": ["talk"], **extra.pop("echo", {})},
            "other": {"image": "img"},
            "slow": {"image": "img"},
        },
        **extra,
    }


@dataclass
class Served:
    stack: FakeStack
    backend: EchoPorts
    echo: Echo
    http: str  # http://127.0.0.1:PORT
    ws: str  # ws://127.0.0.1:PORT

    def slot_of(self, model: str) -> Any:
        return self.stack.swapper.slots[model]

    def requests(self, model: str, code: str) -> float:
        value = self.stack.swapper.metrics.registry.get_sample_value(
            "swapctl_requests_total", {"model": model, "code": code}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def serving(echo: Echo, raw: dict[str, Any]) -> AsyncIterator[Served]:
    backend = EchoPorts({"echo": echo.port, "slow": echo.port})
    backend.behaviour["slow"] = FakeModel(ready_after=3600)  # starts, never ready
    stack = FakeStack(raw, backend, preload=False)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    port = listening.getsockname()[1]
    server = build_server(stack.app, "127.0.0.1", 0, verbose=False, closing=stack.swapper.activity.close)
    running = asyncio.create_task(server.serve(sockets=[listening]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        yield Served(stack, backend, echo, f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        await running
        listening.close()
        for task in list(stack.swapper.tasks):  # a start that never ends
            task.cancel()
        await stack.close()


@pytest.fixture
async def served(echo: Echo) -> AsyncIterator[Served]:
    async with serving(echo, config()) as found:
        yield found


async def until(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds; the test's timeout bounds the wait."""
    while not condition():
        await asyncio.sleep(0.01)


def opened(url: str, **options: Any) -> connect:
    return connect(url, proxy=None, open_timeout=30, **options)


async def whoami(ws: ClientConnection) -> dict[str, Any]:
    await ws.send("whoami")
    answer = json.loads(await ws.recv())
    assert isinstance(answer, dict)
    return answer


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """The close code and reason the client got, once its socket closed."""
    with pytest.raises(ConnectionClosed) as raised:
        await ws.recv()
    rcvd = raised.value.rcvd
    assert rcvd is not None, "closed without a close frame"
    return rcvd.code, rcvd.reason


# --- relaying ---------------------------------------------------------------------------


async def test_text_and_binary_go_both_ways_and_the_model_starts_on_first_connect(served: Served) -> None:
    assert served.backend.running_models() == set()
    async with opened(f"{served.ws}/upstream/echo/ws/socket?a=1&b=two") as ws:
        assert served.backend.running_models() == {"echo"}
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\x01binary\xff")
        assert await ws.recv() == b"\x00\x01binary\xff"
        assert (await whoami(ws))["path"] == "/ws/socket?a=1&b=two"
    assert served.requests("echo", "101") == 1


@pytest.mark.parametrize(
    ("path", "upstream"),
    [
        ("/realtime?model=echo&x=1", "/realtime?model=echo&x=1"),  # ?model=, the query as it came
        ("/v1/realtime?model=talk", "/v1/realtime?model=talk"),  # an alias
        ("/upstream/talk/", "/"),
        ("/upstream/echo", "/"),  # the model's root
    ],
)
async def test_the_model_comes_from_the_path_or_the_query(served: Served, path: str, upstream: str) -> None:
    async with opened(f"{served.ws}{path}") as ws:
        assert (await whoami(ws))["path"] == upstream
    assert served.stack.swapper.running() == ["echo"]


async def test_subprotocols_and_end_to_end_headers_go_on_hop_by_hop_ones_do_not(served: Served) -> None:
    headers = {"x-custom": "kept", "te": "trailers", "cookie": "session=1", "user-agent": "my-client/1"}
    async with opened(
        f"{served.ws}/upstream/echo/", subprotocols=["other", "chat"], additional_headers=headers
    ) as ws:
        assert ws.subprotocol == "chat"
        got = await whoami(ws)
    names = [name for name, _ in got["headers"]]
    values = dict(got["headers"])
    assert (values["x-custom"], values["cookie"], values["user-agent"]) == (
        "kept",
        "session=1",
        "my-client/1",
    )
    assert values["x-forwarded-for"] == "127.0.0.1"
    assert values["sec-websocket-protocol"] == "other, chat"
    assert "te" not in names
    assert values["host"] == f"127.0.0.1:{served.echo.port}"  # the server's own, not the proxy's
    # one handshake: the proxy's own key and version, not the client's passed along beside them
    assert names.count("sec-websocket-key") == names.count("user-agent") == 1
    assert served.echo.seen[-1].subprotocol == "chat"


async def test_close_codes_and_reasons_go_both_ways(served: Served) -> None:
    async with opened(f"{served.ws}/upstream/echo/") as ws:
        await ws.send("close 4002 the server is done")
        assert await closed_with(ws) == (4002, "the server is done")
    async with opened(f"{served.ws}/upstream/echo/") as ws:
        await ws.send("ping")
        assert await ws.recv() == "ping"
        await ws.close(4001, "the client is done")
    await until(lambda: served.echo.seen[-1].closed is not None)
    assert served.echo.seen[-1].closed == (4001, "the client is done")


async def test_a_client_that_vanishes_closes_the_servers_socket_and_ends_its_hold(served: Served) -> None:
    async with opened(f"{served.ws}/upstream/echo/") as ws:
        await ws.send("ping")
        assert await ws.recv() == "ping"
        assert served.slot_of("echo").in_flight == 1
        ws.transport.abort()  # no close frame: the TCP connection just ends
    await until(lambda: served.echo.seen[-1].closed is not None)
    code, _ = served.echo.seen[-1].closed or (None, None)
    assert code in (1000, 1001), code  # a close frame, not a cut (1006); uvicorn says 1005 for both
    await until(lambda: served.slot_of("echo").in_flight == 0)


async def test_a_server_that_refuses_or_breaks_off_ends_the_socket_naming_the_model(served: Served) -> None:
    async with opened(f"{served.ws}/upstream/echo/refuse") as ws:
        code, said = await closed_with(ws)
    assert code == 1014 and "model 'echo'" in said and "HTTP 403" in said
    assert served.requests("echo", "502") == 1
    async with opened(f"{served.ws}/upstream/echo/") as ws:
        await ws.send("drop")
        code, said = await closed_with(ws)
    assert code == 1011 and "model 'echo'" in said and "broke off" in said
    await until(lambda: served.slot_of("echo").in_flight == 0)


async def test_a_server_that_does_not_listen_ends_the_socket_with_1014(echo: Echo) -> None:
    async with serving(echo, config()) as served:
        with socket.socket() as unused:  # a port nothing listens on
            unused.bind(("127.0.0.1", 0))
            served.backend.ports["other"] = unused.getsockname()[1]
        async with opened(f"{served.ws}/upstream/other/") as ws:
            code, said = await closed_with(ws)
        assert code == 1014 and "model 'other'" in said


# --- what is refused ----------------------------------------------------------------------


async def denial(url: str, **options: Any) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body of a refused handshake."""
    with pytest.raises(InvalidStatus) as raised:
        async with opened(url, **options):
            pass
    response = raised.value.response
    body = json.loads(response.body or b"{}")
    assert isinstance(body, dict)
    return response.status_code, body


async def test_an_unknown_model_or_no_model_is_refused_at_the_handshake(served: Served) -> None:
    status, body = await denial(f"{served.ws}/upstream/nosuch/ws")
    assert status == 404 and "'nosuch'" in body["error"]["message"]
    status, body = await denial(f"{served.ws}/ws?model=ghost")
    assert status == 404 and "'ghost'" in body["error"]["message"]
    status, body = await denial(f"{served.ws}/ws")
    assert status == 404 and body["error"]["code"] == "not_found"
    assert served.backend.starts == {}


async def test_the_socket_counts_in_flight_so_a_busy_model_refuses_another(echo: Echo) -> None:
    async with serving(echo, config(echo={"concurrencyLimit": 1})) as served:
        async with opened(f"{served.ws}/upstream/echo/"):
            status, body = await denial(f"{served.ws}/upstream/echo/")
            assert status == 429 and "'echo'" in body["error"]["message"]
        assert served.requests("echo", "429") == 1
        async with opened(f"{served.ws}/upstream/echo/") as ws:  # released: admitted again
            await ws.send("again")
            assert await ws.recv() == "again"


async def test_a_client_that_leaves_while_its_model_starts_gives_up_its_hold(served: Served) -> None:
    connecting = asyncio.create_task(opened(f"{served.ws}/upstream/slow/").__aenter__())
    await until(lambda: served.slot_of("slow").state is State.STARTING)
    assert served.slot_of("slow").in_flight == 1
    connecting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await connecting
    await until(lambda: served.slot_of("slow").in_flight == 0)


# --- the lease holds the model ----------------------------------------------------------


async def test_an_open_socket_holds_its_model_while_a_request_that_evicts_it_waits(served: Served) -> None:
    async with httpx.AsyncClient(base_url=served.http, timeout=60) as client:
        async with opened(f"{served.ws}/upstream/echo/") as ws:
            evicting = asyncio.create_task(
                client.post("/v1/chat/completions", json={"model": "other", "messages": []})
            )
            await until(lambda: served.slot_of("echo").state is State.LEAVING)
            await ws.send("still here")  # the eviction waits for the socket: it is not cut
            assert await ws.recv() == "still here"
            assert not evicting.done()
            assert served.backend.running_models() == {"echo"}
        answer = await evicting
    assert answer.status_code == 200, answer.text
    assert served.backend.running_models() == {"other"}
    assert served.echo.seen[-1].closed == (1000, "")


# --- the guard --------------------------------------------------------------------------


def key_protocol(key: str) -> str:
    return "swapctl.key." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


@pytest.fixture
async def keyed(echo: Echo) -> AsyncIterator[Served]:
    async with serving(echo, config(apiKeys=[KEY], cors=[APP])) as found:
        yield found


async def test_a_websocket_needs_a_key_in_a_header_or_its_subprotocol(keyed: Served) -> None:
    url = f"{keyed.ws}/upstream/echo/"
    status, body = await denial(url)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert "subprotocol" in body["error"]["message"]
    assert (await denial(url, additional_headers={"authorization": "Bearer wrong"}))[0] == 401
    assert (await denial(url, subprotocols=[key_protocol("wrong")]))[0] == 401
    assert (await denial(url, subprotocols=["swapctl.key.%%%"]))[0] == 401
    assert keyed.backend.starts == {}
    for headers in ({"authorization": f"Bearer {KEY}"}, {"x-api-key": KEY}):
        async with opened(url, additional_headers=headers) as ws:
            sent = dict(await whoami(ws))
        assert KEY not in json.dumps(sent["headers"])  # the key is swapctl's


async def test_the_key_subprotocol_never_reaches_the_server_and_answers_when_it_picks_none(
    keyed: Served,
) -> None:
    url = f"{keyed.ws}/upstream/echo/"
    async with opened(url, subprotocols=[key_protocol(KEY)]) as ws:
        assert ws.subprotocol == key_protocol(KEY)  # a browser needs one of its own back
        await whoami(ws)
    assert keyed.echo.seen[-1].subprotocol is None
    assert "sec-websocket-protocol" not in keyed.echo.seen[-1].headers
    async with opened(url, subprotocols=[key_protocol(KEY), "chat"]) as ws:
        assert ws.subprotocol == "chat"
        assert KEY not in json.dumps(await whoami(ws))
    assert keyed.echo.seen[-1].headers["sec-websocket-protocol"] == "chat"


async def test_a_websocket_from_another_sites_page_is_refused(keyed: Served) -> None:
    url = f"{keyed.ws}/upstream/echo/"
    key = {"x-api-key": KEY}
    status, body = await denial(url, origin=EVIL, additional_headers=key)
    assert (
        status == 403 and body["error"]["code"] == "origin_not_allowed" and EVIL in body["error"]["message"]
    )
    for origin in (APP, keyed.http):  # in cors; this server's own pages
        async with opened(url, origin=origin, additional_headers=key) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
    assert keyed.backend.started == ["echo"]


async def guarded(host: bytes, denial: bool) -> list[Message]:
    """What the guard sends for a handshake with this Host, under a server that can send an
    HTTP denial or one that cannot (the app behind it accepts every socket)."""
    scope = {
        "type": "websocket",
        "path": "/upstream/echo/",
        "raw_path": b"/upstream/echo/",
        "query_string": b"",
        "headers": [(b"host", host)],
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}} if denial else {},
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        sent.append(message)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "websocket.accept"})

    await Guard(app, listen_host="127.0.0.1")(scope, receive, send)
    return sent


async def test_a_websocket_under_a_host_name_it_does_not_answer_to_is_refused() -> None:
    sent = await guarded(b"rebound.example:8080", denial=True)
    assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 421
    assert b"rebound.example" in b"".join(m.get("body", b"") for m in sent[1:])
    assert await guarded(b"rebound.example", denial=False) == [
        {"type": "websocket.close", "code": 1008, "reason": ""}
    ]
    assert await guarded(b"localhost:8080", denial=True) == [{"type": "websocket.accept"}]


# --- the redirect -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_upstream_model_without_its_slash_redirects_without_starting_it(
    served: Served, method: str
) -> None:
    async with httpx.AsyncClient(base_url=served.http) as client:
        answer = await client.request(method, "/upstream/talk?x=1&y=%2F")
        assert answer.status_code == 308
        assert answer.headers["location"] == "./talk/?x=1&y=%2F"
        assert str(answer.next_request.url if answer.next_request else "") == (
            f"{served.http}/upstream/talk/?x=1&y=%2F"
        )
        assert served.backend.starts == {}
        assert (await client.request(method, "/upstream/nosuch")).status_code == 404
        posted = await client.post("/upstream/echo", content=b"x")  # other methods: the model's root
    assert posted.status_code == 200 and posted.json()["path"] == "/"


# --- on record ----------------------------------------------------------------------------


async def test_each_websocket_is_on_record_as_its_handshake(served: Served) -> None:
    async with opened(f"{served.ws}/upstream/echo/ws/socket") as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
    await denial(f"{served.ws}/ws?model=ghost")
    async with httpx.AsyncClient(base_url=served.http) as client:
        record = (await client.get("/requests")).json()["requests"]
    refused, opened_one = record
    assert (opened_one["model"], opened_one["method"], opened_one["route"]) == (
        "echo",
        "GET",
        "/upstream/echo/ws/socket",
    )
    assert (opened_one["status"], opened_one["in_flight"], opened_one["place"]) == (101, False, "local")
    assert (
        opened_one["swap"] is not None and opened_one["swap"]["model"] == "echo"
    )  # it waited for echo's start
    assert (refused["model"], refused["status"], refused["route"]) == ("ghost", 404, "/ws")
    assert "'ghost'" in refused["error"] and not refused["in_flight"]
