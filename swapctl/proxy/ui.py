"""The web page at GET /ui: one HTML file shipped beside this module, its style and script inline.

The page holds no data: everything it shows comes from the routes it calls (`/events`,
`/plan/<model>`, `/load/<model>`, `/unload/<model>`, `/logs/<model>/stream`), with the
user's key when the proxy has keys, so the page itself is served without one. Its
Content-Security-Policy allows exactly its own inline script and style (by their SHA-256,
computed once from the file) and connections to its own origin only (images also from data:
URLs, audio also from blob: URLs: what the playground got from the proxy, made in the page);
model names and log lines are untrusted, and the script writes them as text, never as markup.

The charts are drawn by uPlot (vendor/, MIT, its license beside it), put into the page as it
is read: `<script data-vendor="FILE"></script>` (and `<style ...>`) become the file's text,
inline, so that one response holds the page and one policy allows exactly what it runs.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import re
from collections.abc import Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

PATH = "/ui"
FILE = "ui.html"
VENDOR = "vendor"  # a folder beside this module: the libraries the page inlines
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)
_VENDORED = re.compile(r'<(script|style) data-vendor="([\w.-]+)"></\1>')


@dataclass(frozen=True)
class Page:
    html: bytes
    headers: dict[str, str]


def csp_hash(text: str) -> str:
    """A CSP source for an inline script or style whose text is exactly `text`."""
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def parse_page(html: str) -> Page:
    """The page and the headers it is served with: its inline blocks allowed by hash, nothing else."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for tag, text in _INLINE.findall(html):
        hashes[tag].append(csp_hash(text))
    allowed = {tag: " ".join(sources) or "'none'" for tag, sources in hashes.items()}
    policy = "; ".join(
        [
            "default-src 'self'",
            f"script-src {allowed['script']}",
            f"style-src {allowed['style']}",
            "img-src 'self' data:",  # data: for the empty icon (no request for /favicon.ico), and images
            "media-src 'self' blob:",  # blob: for the speech the playground plays, made in the page
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    headers = {
        "content-security-policy": policy,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "x-frame-options": "DENY",
        "cache-control": "no-cache",
    }
    return Page(html.encode(), headers)


def inline_vendored(html: str, read: Callable[[str], str]) -> str:
    """The page with each `data-vendor` block filled with the text `read` gives for its file."""

    def fill(found: re.Match[str]) -> str:
        tag, text = found[1], read(found[2])
        if f"</{tag}" in text:  # it would end its block early
            raise ValueError(f"{found[2]} cannot be inlined: it holds </{tag}")
        return f"<{tag}>{text}</{tag}>"

    return _VENDORED.sub(fill, html)


def load_page() -> Page:
    """The page as shipped in the package, its libraries inlined."""
    here = importlib.resources.files("swapctl.proxy")
    html = here.joinpath(FILE).read_text(encoding="utf-8")
    return parse_page(
        inline_vendored(html, lambda name: here.joinpath(VENDOR, name).read_text(encoding="utf-8"))
    )


def routes() -> list[Route]:
    """GET (and HEAD) /ui; the file is read once, here."""
    page = load_page()

    async def ui(request: Request) -> Response:
        return Response(page.html, media_type="text/html; charset=utf-8", headers=page.headers)

    return [Route(PATH, ui, methods=["GET"])]
