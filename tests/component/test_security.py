"""Safe on the network by default: the Host check, CORS, API keys, hop-by-hop headers and
POST-only admin actions. Component tests over the fake backend, as in test_proxy.py."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send
from support import json_server

import swapctl
from swapctl import cli
from swapctl.backend.fake import FakeBackend, FakeContainer, FakeModel
from swapctl.config import parse_config
from swapctl.config.scalars import host_of, is_loopback
from swapctl.errors import ConfigError, SwapctlError
from swapctl.lifecycle import Swapper
from swapctl.proxy import build_app
from swapctl.proxy.guard import Guard
from swapctl.proxy.upstream import HttpxUpstream

KEY = "sk-swapctl-9f3a1c"  # what must never be printed
OTHER_KEY = "second-key-7781"
EVIL = "http://evil.example"
APP = "http://localhost:3000"

Proxy = tuple[httpx.AsyncClient, FakeBackend]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def echo_headers(request: httpx.Request, box: FakeContainer) -> httpx.Response:
    """An upstream that reports the headers it got, and answers with CORS and hop-by-hop
    headers of its own."""
    if request.url.path == "/health":
        return httpx.Response(200)
    own = {
        "access-control-allow-origin": "*",
        "access-control-allow-credentials": "true",
        "connection": "keep-alive, x-upstream-hop",
        "x-upstream-hop": "1",
        "x-upstream-kept": "1",
    }
    return httpx.Response(200, json=dict(request.headers), headers=own)


def config(**extra: Any) -> dict[str, Any]:
    return {
        "instance": "test",
        "models": {"code": {"image": "img"}, "broken": {"image": "img"}},
        **extra,
    }


@contextlib.asynccontextmanager
async def serving(
    raw: dict[str, Any], base_url: str = "http://127.0.0.1:8080", listen_host: str | None = None
) -> AsyncIterator[Proxy]:
    backend = FakeBackend()
    backend.behaviour["code"] = FakeModel(handler=echo_headers)
    backend.behaviour["broken"] = FakeModel(exit_at_start="fatal: no model")
    upstream = httpx.AsyncClient(transport=backend.transport)
    swapper = Swapper(parse_config(raw), backend, upstream)
    app = build_app(
        swapper.config, swapper, HttpxUpstream(upstream), swapper.metrics, listen_host=listen_host
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as client:
        yield client, backend
    await upstream.aclose()


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    async with serving(config()) as served:
        yield served


@pytest.fixture
async def keyed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Proxy]:
    monkeypatch.setenv("SWAPCTL_TEST_KEY", KEY)
    async with serving(config(apiKeys=["${SWAPCTL_TEST_KEY}", OTHER_KEY])) as served:
        yield served


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", code)
    return error


def cors_headers(response: httpx.Response) -> list[str]:
    return [name for name in response.headers if name.lower().startswith("access-control-")]


# --- admin actions and cross-site requests -------------------------------------------------


@pytest.mark.anyio
async def test_unload_is_post_only(proxy: Proxy) -> None:
    client, backend = proxy
    await client.get("/upstream/code/x")
    assert_openai_error(await client.get("/unload"), 405, "method_not_allowed")
    assert_openai_error(await client.get("/unload/code"), 405, "method_not_allowed")
    assert backend.running_models() == {"code"}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        {"origin": EVIL},  # fetch() or a form from another site
        {"origin": "null"},  # a sandboxed frame
        {"origin": "http://127.0.0.1:3000"},  # another port is another origin
        {"sec-fetch-site": "cross-site"},  # a browser request that carries no Origin
        {"sec-fetch-site": "same-site"},
    ],
)
async def test_other_sites_pages_cannot_stop_nor_start_models(proxy: Proxy, headers: dict[str, str]) -> None:
    client, backend = proxy
    await client.get("/upstream/code/x")
    refused = await client.post("/unload", headers=headers)
    assert_openai_error(refused, 403, "origin_not_allowed")
    assert cors_headers(refused) == []
    assert_openai_error(await client.post("/upstream/broken/x", headers=headers), 403, "origin_not_allowed")
    assert backend.running_models() == {"code"}
    assert "broken" not in backend.starts


@pytest.mark.anyio
async def test_same_origin_pages_work_without_cors_headers(proxy: Proxy) -> None:
    """A model's web UI under /upstream/ calls the proxy from the proxy's own origin."""
    client, _ = proxy
    response = await client.get(
        "/upstream/code/props", headers={"origin": "http://127.0.0.1:8080", "sec-fetch-site": "same-origin"}
    )
    assert response.status_code == 200
    assert cors_headers(response) == []
    assert (await client.post("/unload", headers={"origin": "http://127.0.0.1:8080"})).status_code == 200


# --- CORS ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_upstream_cors_headers_never_leave(proxy: Proxy) -> None:
    client, _ = proxy
    response = await client.get("/upstream/code/x")
    assert response.status_code == 200
    assert cors_headers(response) == []
    stream = await client.post("/v1/chat/completions", json={"model": "code", "stream": True})
    assert cors_headers(stream) == []


@pytest.mark.anyio
async def test_an_allowed_origin_gets_its_own_cors_headers_only() -> None:
    async with serving(config(cors=[APP])) as (client, _):
        response = await client.get("/upstream/code/x", headers={"origin": APP})
        assert response.status_code == 200
        assert response.headers.get_list("access-control-allow-origin") == [APP]  # not upstream's '*'
        assert "access-control-allow-credentials" not in response.headers
        assert "Origin" in response.headers.get_list("vary")
        plain = await client.get("/v1/models")
        assert cors_headers(plain) == []
        assert "Origin" in plain.headers.get_list("vary")  # caches keep the two answers apart
        assert_openai_error(
            await client.get("/v1/models", headers={"origin": EVIL}), 403, "origin_not_allowed"
        )


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/upstream/code/v1/chat/completions", "/v1/chat/completions?model=code"])
async def test_preflight_is_answered_and_never_forwarded(path: str) -> None:
    async with serving(config(cors=[APP], apiKeys=[KEY])) as (client, backend):
        asked = {
            "origin": APP,
            "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type, x-stainless-os",
        }
        response = await client.options(path, headers=asked)  # no key: browsers send none here
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == APP
        assert "POST" in response.headers["access-control-allow-methods"]
        assert (
            response.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
        )
        assert response.headers["access-control-max-age"] == "600"
        refused = await client.options(path, headers={**asked, "origin": EVIL})
        assert_openai_error(refused, 403, "origin_not_allowed")
        assert cors_headers(refused) == []
        assert backend.starts == {}  # neither reached a model
        # a plain OPTIONS (no preflight) is still a passthrough
        plain = await client.options("/upstream/code/x", headers={"authorization": f"Bearer {KEY}"})
        assert plain.status_code == 200
        assert backend.starts == {"code": 1}


@pytest.mark.anyio
async def test_cors_star_allows_any_origin_by_name() -> None:
    async with serving(config(cors=["*"])) as (client, _):
        response = await client.get("/v1/models", headers={"origin": EVIL})
        assert response.headers["access-control-allow-origin"] == EVIL


# --- Host ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("attacker.example", False),
        ("attacker.example:8080", False),
        ("localhost.attacker.example", False),
        ("corp.example", False),  # '*.corp.example' names what is under it
        ("swapctl", False),
        ("localhost", True),
        ("LOCALHOST:8080", True),
        ("localhost.:8080", True),
        ("ui.localhost:8080", True),
        ("127.0.0.1:8080", True),
        ("127.1.2.3", True),
        ("[::1]:8080", True),
        ("10.1.2.3:8080", True),  # an IP address cannot be rebound
        ("[fe80::1]", True),
        ("gpu-box.lan:8080", True),  # the listen host
        ("models.example.com", True),
        ("a.b.corp.example:443", True),
    ],
)
async def test_host_check_refuses_names_it_does_not_answer_to(host: str, allowed: bool) -> None:
    extra = config(allowedHosts=["models.example.com", "*.corp.example"])
    async with serving(extra, listen_host="gpu-box.lan") as (client, backend):
        response = await client.post("/v1/chat/completions", json={"model": "code"}, headers={"host": host})
        if allowed:
            assert response.status_code == 200
        else:
            error = assert_openai_error(response, 421, "host_not_allowed")
            assert "allowedHosts" in error["message"]
            assert backend.starts == {}


@pytest.mark.anyio
async def test_allowed_hosts_star_and_the_config_listen() -> None:
    async with serving(config(allowedHosts=["*"])) as (client, _):
        assert (await client.get("/health", headers={"host": "anything.example"})).status_code == 200
    async with serving(config(listen="box.lan:8080")) as (client, _):
        assert (await client.get("/health", headers={"host": "box.lan:8080"})).status_code == 200
        assert (await client.get("/health", headers={"host": "other.lan:8080"})).status_code == 421


async def _ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _status(guard: Guard, headers: list[tuple[bytes, bytes]]) -> int:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "query_string": b"",
        "headers": headers,
        "http_version": "1.0",
    }
    await guard(scope, receive, send)
    status: int = sent[0]["status"]
    return status


@pytest.mark.anyio
async def test_a_request_without_host_passes() -> None:
    guard = Guard(_ok, listen_host="127.0.0.1")
    assert await _status(guard, []) == 200  # HTTP/1.0 may send none
    assert await _status(guard, [(b"host", b"evil.example")]) == 421


def test_host_forms_and_loopback() -> None:
    assert [host_of(h) for h in ("[::1]:80", "::1", "Box.LAN.:8080", "[::]", "0.0.0.0:1")] == [
        "::1",
        "::1",
        "box.lan",
        "::",
        "0.0.0.0",
    ]
    assert all(is_loopback(h) for h in ("localhost", "a.localhost", "127.0.0.5", "::1", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.2", "localhost.example"))


# --- API keys ------------------------------------------------------------------------------

GUARDED = [
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/upstream/code/x"),
    ("GET", "/slots?model=code"),
    ("GET", "/logs"),
    ("GET", "/logs/code"),
    ("GET", "/metrics"),
    ("GET", "/running"),
    ("GET", "/version"),
    ("POST", "/unload"),
    ("POST", "/unload/code"),
    ("GET", "/nowhere"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("method", "path"), GUARDED)
async def test_every_route_but_health_needs_a_key(keyed: Proxy, method: str, path: str) -> None:
    client, backend = keyed
    body = {"model": "code"} if method == "POST" else None
    for headers in ({}, {"authorization": "Bearer nope"}, {"x-api-key": "nope"}, {"authorization": KEY}):
        response = await client.request(method, path, json=body, headers=headers)
        error = assert_openai_error(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        assert ("missing" in error["message"]) == (not headers)
    assert backend.starts == {}
    assert (await client.get("/health")).text == "OK"


@pytest.mark.anyio
async def test_bearer_and_x_api_key_both_work_and_stay_here(keyed: Proxy) -> None:
    client, _ = keyed
    got = (await client.get("/upstream/code/x", headers={"authorization": f"Bearer {KEY}"})).json()
    assert "authorization" not in got
    got = (await client.get("/upstream/code/x", headers={"x-api-key": OTHER_KEY})).json()
    assert "x-api-key" not in got
    # a header that carries no swapctl key is the client's own, for the model's server
    both = {"x-api-key": KEY, "authorization": "Bearer upstream-own-key"}
    got = (await client.get("/upstream/code/x", headers=both)).json()
    assert got["authorization"] == "Bearer upstream-own-key"
    assert "x-api-key" not in got
    assert (await client.get("/running", headers={"authorization": f"bearer {KEY}"})).status_code == 200
    version = await client.get("/version", headers={"authorization": f"Bearer {KEY}"})
    assert version.json() == {"version": swapctl.__version__}


@pytest.mark.anyio
async def test_without_keys_the_client_headers_go_upstream_as_before(proxy: Proxy) -> None:
    client, _ = proxy
    got = (
        await client.get("/upstream/code/x", headers={"authorization": "Bearer x", "x-api-key": "y"})
    ).json()
    assert (got["authorization"], got["x-api-key"]) == ("Bearer x", "y")


@pytest.mark.anyio
async def test_an_allowed_origin_can_read_the_401() -> None:
    async with serving(config(cors=[APP], apiKeys=[KEY])) as (client, _):
        response = await client.get("/v1/models", headers={"origin": APP})
        assert response.status_code == 401
        assert response.headers["access-control-allow-origin"] == APP


@pytest.mark.anyio
async def test_the_key_is_never_printed(
    keyed: Proxy, caplog: pytest.LogCaptureFixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client, _ = keyed
    caplog.set_level(logging.DEBUG)
    auth = {"authorization": f"Bearer {KEY}"}
    await client.post("/v1/chat/completions", json={"model": "code"}, headers=auth)
    await client.post("/v1/chat/completions", json={"model": "broken"}, headers=auth)  # 502, logged
    await client.post("/v1/chat/completions", json={"model": "nope"}, headers={"x-api-key": KEY})
    await client.get("/running", headers={"authorization": "Bearer sk-swapctl-9f3a1d"})  # near miss
    logs = await client.get("/logs", headers=auth)
    assert logs.status_code == 200
    assert KEY not in caplog.text and KEY not in logs.text

    loaded = parse_config(config(apiKeys=["${SWAPCTL_TEST_KEY}", OTHER_KEY]))
    assert loaded.api_keys[0].get_secret_value() == KEY
    for shown in (repr(loaded), str(loaded), repr(loaded.api_keys)):
        assert KEY not in shown and OTHER_KEY not in shown
    path = tmp_path / "swapctl.yaml"
    path.write_text(f"models: {{a: {{image: x}}}}\napiKeys: ['{KEY}']\n")
    code, out, err = run_cli(capsys, "validate", "-c", str(path))
    assert code == 0 and KEY not in out + err


@pytest.mark.parametrize(
    "keys",
    [KEY, [int("9" * 12)], [f"{KEY} with spaces"], [{"env": KEY}]],
)
def test_a_malformed_key_is_not_shown_in_its_error(keys: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config(apiKeys=keys))
    assert caught.value.path.startswith("apiKeys")
    assert str(keys if isinstance(keys, str) else keys[0]) not in str(caught.value)
    assert "9" * 12 not in str(caught.value) and KEY not in str(caught.value)


def test_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWAPCTL_TEST_KEY", KEY)
    monkeypatch.setenv("SWAPCTL_EMPTY_KEY", "")
    monkeypatch.delenv("SWAPCTL_UNSET_KEY", raising=False)
    keys = parse_config(config(apiKeys=[OTHER_KEY, "${SWAPCTL_TEST_KEY}"])).api_keys
    assert [k.get_secret_value() for k in keys] == [OTHER_KEY, KEY]
    for name in ("SWAPCTL_EMPTY_KEY", "SWAPCTL_UNSET_KEY"):
        with pytest.raises(ConfigError) as caught:
            parse_config(config(apiKeys=[KEY, f"${{{name}}}"]))
        assert caught.value.path == "apiKeys.1"
        assert name in caught.value.message
    with pytest.raises(ConfigError) as caught:  # (`${not-a-name}` is Compose's `${not-default}`)
        parse_config(config(apiKeys=["${not a name}"]))
    assert caught.value.path == "apiKeys.0"


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ({"cors": ["http://localhost:3000/"]}, "cors.0", "no path"),
        ({"cors": ["localhost:3000"]}, "cors.0", "scheme://host"),
        ({"cors": "http://localhost:3000"}, "cors", "valid tuple"),
        ({"allowedHosts": ["ok.example", "http://x.example"]}, "allowedHosts.1", "no scheme"),
        ({"allowedHosts": ["x.example:8080"]}, "allowedHosts.0", "no port"),
    ],
)
def test_cors_and_allowed_hosts_errors_name_the_key_path(
    extra: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config(**extra))
    assert caught.value.path == path
    assert words in caught.value.message


def test_cors_and_hosts_are_normalised() -> None:
    loaded = parse_config(config(cors=["HTTP://LocalHost:3000", "*"], allowedHosts=["*.Corp.Example"]))
    assert (loaded.cors, loaded.allowed_hosts) == (("http://localhost:3000", "*"), ("*.corp.example",))


# --- headers sent on -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_headers_named_in_connection_are_not_forwarded(proxy: Proxy) -> None:
    client, _ = proxy
    sent = {
        "connection": "keep-alive, X-Hop-Secret",
        "x-hop-secret": "for this hop only",
        "proxy-connection": "keep-alive",
        "keep-alive": "timeout=5",
        "x-kept": "yes",
    }
    response = await client.get("/upstream/code/x", headers=sent)
    got = response.json()
    assert got["x-kept"] == "yes"
    for name in ("x-hop-secret", "proxy-connection", "keep-alive"):
        assert name not in got
    assert "x-upstream-hop" not in response.headers  # and the same on the way back
    assert response.headers["x-upstream-kept"] == "1"


@pytest.mark.anyio
async def test_x_forwarded_for_is_appended(proxy: Proxy) -> None:
    client, _ = proxy
    assert (await client.get("/upstream/code/x")).json()["x-forwarded-for"] == "127.0.0.1"
    got = (await client.get("/upstream/code/x", headers={"x-forwarded-for": "203.0.113.9"})).json()
    assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"


# --- the CLI -------------------------------------------------------------------------------


def run_cli(
    capsys: pytest.CaptureFixture[str], *argv: str, backend: cli.BackendFactory = cli.docker_backend
) -> tuple[int, str, str]:
    try:
        cli.main(list(argv), backend_factory=backend)
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def fake_proxy(seen: list[str | None]) -> contextlib.AbstractContextManager[str]:
    """An HTTP server on 127.0.0.1 that answers /running and records each Authorization."""

    def answer(request: BaseHTTPRequestHandler) -> object:
        seen.append(request.headers.get("authorization"))
        model = {"model": "a", "state": "stopped", "container": None, "host_port": None}
        model |= {"in_flight": None, "ready_seconds": None, "idle_seconds": None}
        return {"running": [], "models": [model]}

    return json_server(answer)


def test_status_sends_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWAPCTL_TEST_KEY", KEY)
    monkeypatch.delenv("SWAPCTL_API_KEY", raising=False)
    path = tmp_path / "swapctl.yaml"
    path.write_text("models: {a: {image: x}}\napiKeys: ['${SWAPCTL_TEST_KEY}', other]\n")
    seen: list[str | None] = []
    with fake_proxy(seen) as url:
        code, out, _ = run_cli(capsys, "status", "-c", str(path), "--url", url, "--json")
        assert code == 0 and json.loads(out)["source"] == "proxy"
        monkeypatch.setenv("SWAPCTL_API_KEY", "from-the-environment")
        assert run_cli(capsys, "status", "-c", str(path), "--url", url, "--json")[0] == 0
        path.write_text("models: {a: {image: x}}\n")
        monkeypatch.delenv("SWAPCTL_API_KEY")
        assert run_cli(capsys, "status", "-c", str(path), "--url", url, "--json")[0] == 0
    assert seen == [f"Bearer {KEY}", "Bearer from-the-environment", None]


@pytest.mark.parametrize(
    ("listen", "keys", "warned"),
    [("0.0.0.0:8080", [], True), ("0.0.0.0:8080", [KEY], False), ("localhost:8080", [], False)],
)
def test_up_warns_when_anyone_on_the_network_can_use_it(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    listen: str,
    keys: list[str],
    warned: bool,
) -> None:
    def no_docker() -> NoReturn:
        raise SwapctlError("no Docker in this test")

    caplog.set_level(logging.WARNING, logger="swapctl")
    path = tmp_path / "swapctl.yaml"
    path.write_text(json.dumps(config(apiKeys=keys)))
    code, _, err = run_cli(capsys, "up", "-c", str(path), "--listen", listen, backend=no_docker)
    assert (code, err.strip()) == (1, "error: no Docker in this test")
    assert ("anyone on the network can use and stop your models" in caplog.text) == warned
    assert KEY not in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/ui", "/health"])
async def test_a_link_from_another_site_opens_the_page(proxy: Proxy, path: str) -> None:
    """A top-level navigation carries no Origin, only Sec-Fetch-Site: the page holds no data,
    changes nothing and cannot be framed; what it then calls comes from its own origin."""
    client, backend = proxy
    navigation = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert (await client.get(path, headers=navigation)).status_code == 200
    assert_openai_error(await client.post("/unload", headers=navigation), 403, "origin_not_allowed")
    assert_openai_error(await client.get("/running", headers=navigation), 403, "origin_not_allowed")
    fetched = await client.get(path, headers={"origin": EVIL, "sec-fetch-site": "cross-site"})
    assert_openai_error(fetched, 403, "origin_not_allowed")  # a script on that site: no
    assert backend.running_models() == set()
