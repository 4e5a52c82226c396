"""The page at /ui as the proxy serves it: its headers, open without a key while the data
routes it calls are not, and a policy that lets only its own inline script and style run.
Its behaviour in a real browser: tests/real/test_ui.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from swapctl.backend.fake import FakeBackend
from swapctl.config import parse_config
from swapctl.lifecycle import Swapper
from swapctl.proxy import build_app
from swapctl.proxy.ui import csp_hash, inline_vendored, load_page, parse_page
from swapctl.proxy.upstream import HttpxUpstream

pytestmark = pytest.mark.anyio
KEY = "sk-ui-5d1e"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def keyed() -> AsyncIterator[httpx.AsyncClient]:
    backend = FakeBackend()
    upstream = httpx.AsyncClient(transport=backend.transport)
    swapper = Swapper(parse_config({"models": {"a": {"image": "img"}}, "apiKeys": [KEY]}), backend, upstream)
    app = build_app(swapper.config, swapper, HttpxUpstream(upstream), swapper.metrics, preload=False)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        yield client
    await upstream.aclose()


async def test_the_page_needs_no_key_and_says_how_a_browser_must_treat_it(
    keyed: httpx.AsyncClient,
) -> None:
    page = await keyed.get("/ui")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["content-security-policy"].startswith("default-src 'self'; ")
    assert page.text == load_page().html.decode()
    assert (await keyed.head("/ui")).status_code == 200
    # what it shows comes from routes that still need the key
    assert (await keyed.get("/running")).status_code == 401
    assert (await keyed.get("/ui/more")).status_code == 401  # only the page itself is open
    assert (await keyed.get("/ui", headers={"authorization": f"Bearer {KEY}"})).status_code == 200


async def test_the_page_is_get_only(keyed: httpx.AsyncClient) -> None:
    refused = await keyed.post("/ui", headers={"authorization": f"Bearer {KEY}"})
    assert refused.status_code == 405
    assert refused.json()["error"]["code"] == "method_not_allowed"


def test_the_policy_allows_exactly_the_inline_script_and_style() -> None:
    html = "<style>b{}</style><p>x</p><script>go()</script><script>more()</script>"
    policy = parse_page(html).headers["content-security-policy"]
    directives = dict(part.split(" ", 1) for part in policy.split("; "))
    assert directives["script-src"] == f"{csp_hash('go()')} {csp_hash('more()')}"
    assert directives["style-src"] == csp_hash("b{}")
    assert directives["frame-ancestors"] == "'none'"
    nothing = parse_page("<p>no script</p>").headers["content-security-policy"]
    assert "script-src 'none'" in nothing


def test_the_shipped_page_is_self_contained_and_writes_no_markup_from_data() -> None:
    page = load_page()
    html = page.html.decode()
    # its own script and style, and uPlot's (inlined from vendor/), each allowed by its hash
    assert html.count("<script>") == 2 and html.count("<style>") == 2
    assert "data-vendor" not in html
    policy = page.headers["content-security-policy"]
    for tag in ("script", "style"):
        for block in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL):
            assert csp_hash(block) in policy
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from the network
    assert not re.search(r"<[a-z]+[^>]*\son[a-z]+=", html)  # no inline handlers (the policy forbids them)
    for script in re.findall(r"<script>(.*?)</script>", html, re.DOTALL):
        for sink in (
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
        ):
            assert sink not in script


def test_a_vendored_file_is_inlined_and_one_that_would_end_its_block_is_refused() -> None:
    files = {"lib.js": "var lib = 1;", "lib.css": ".u{}", "bad.js": "x = '</script>';"}
    html = '<style data-vendor="lib.css"></style><script data-vendor="lib.js"></script><script>go()</script>'
    assert (
        inline_vendored(html, files.__getitem__)
        == "<style>.u{}</style><script>var lib = 1;</script><script>go()</script>"
    )
    with pytest.raises(ValueError, match=r"bad\.js cannot be inlined"):
        inline_vendored('<script data-vendor="bad.js"></script>', files.__getitem__)
