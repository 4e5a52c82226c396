"""Every request on record: the last `requestRecord` requests the forwarding routes answered,
each with its model, route, status, times, tokens and speed, where it went and the swap it
waited for; with `captureBuffer` (MB), their bodies too. `GET /requests` lists them (newest
first), `GET /requests/<id>` gives one with its capture, `POST /requests/<id>/cancel` cancels
one in flight, and `/events` sends a `request` event as each one ends.

The hot path pays a contextvar, a few attributes and a deque append per request; JSON is
made only when asked (by a route, or by a subscriber of `/events`).

Captures never hold an API key: the headers `authorization`, `proxy-authorization`,
`x-api-key`, `api-key`, `cookie` and `set-cookie` are left out. Bodies are kept as they were
sent (after the model's filters): a key a client writes into its own JSON body is its data,
and stays. The buffer holds at most `captureBuffer` MB, captures in flight included: the
oldest finished captures are dropped to make room; a stream longer than the room left is
cut (`"cut": true`).

A request cancelled in flight ends as a client leaving does (its upstream request closed,
its lease released: the model serves the others) and is answered 499, `request_cancelled`,
naming the model: a 4xx, so that clients do not send it again; a stream already begun ends
with that error event (a stream that is not an event stream is ended where it was)."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Scope

from swapctl.config import Config
from swapctl.config.hosts import LOCAL_NAME
from swapctl.errors import RequestError
from swapctl.lifecycle.activity import Activity, Swap
from swapctl.proxy.upstream import RawHeaders, Tally

SECRET = frozenset(
    {b"authorization", b"proxy-authorization", b"x-api-key", b"api-key", b"cookie", b"set-cookie"}
)
CANCELLED = 499  # the status of a request cancelled in flight (as nginx's "client closed request")
USAGE_TAIL = 8192  # bytes at the end of a whole answer where its usage and timings are looked for
_PROMPT = re.compile(rb'"(?:prompt_tokens|input_tokens|prompt_n)"\s*:\s*(\d{1,12})')
_PREDICTED_SPEED = re.compile(rb'"predicted_per_second"\s*:\s*([0-9.eE+-]{1,32})')
_PROMPT_SPEED = re.compile(rb'"prompt_per_second"\s*:\s*([0-9.eE+-]{1,32})')

CURRENT: contextvars.ContextVar[Entry | None] = contextvars.ContextVar("swapctl_request", default=None)


def cancelled_error(model: str, id: str) -> RequestError:
    return RequestError(
        CANCELLED,
        f"model '{model}': the request was cancelled (POST /requests/{id}/cancel)",
        "request_cancelled",
    )


def _number(pattern: re.Pattern[bytes], data: bytes | None) -> float | None:
    found = pattern.search(data) if data else None
    if found is None:
        return None
    try:
        return float(found[1])
    except ValueError:
        return None


def _body(data: bytes) -> dict[str, Any]:
    """A body in JSON: as text where it is UTF-8, else in base64."""
    try:
        return {"body": data.decode()}
    except UnicodeDecodeError:
        return {"body_base64": base64.b64encode(data).decode()}


def _kept_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers without those that carry keys (names lower-cased, as the server and the
    upstream client give them)."""
    return [(n, v) for n, v in raw if n.lower() not in SECRET]


def _headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]


class Captures:
    """The memory that captures take, at most `limit` bytes: the oldest finished captures are
    dropped to make room."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.finished: deque[Entry] = deque()

    def take(self, size: int) -> int:
        """Up to `size` bytes, room made by dropping the oldest finished captures: the bytes
        granted (fewer once the captures in flight fill the buffer)."""
        while self.used + size > self.limit and self.finished:
            dropped = self.finished.popleft()
            if dropped.capture is not None:
                self.used -= dropped.capture.size
                dropped.capture = None
        granted = max(min(size, self.limit - self.used), 0)
        self.used += granted
        return granted


class Capture:
    """One request's bodies and headers (no secrets), the response's as far as room allowed."""

    __slots__ = ("buffer", "cut", "request", "request_headers", "response", "response_headers", "size")

    def __init__(self, buffer: Captures, headers: RawHeaders, body: bytes) -> None:
        self.buffer, self.cut, self.size = buffer, False, 0
        self.request_headers = _kept_headers(headers)
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.response: list[bytes] = []
        self.request = self._kept(body)

    def _kept(self, data: bytes) -> bytes:
        if self.cut or not data:
            return b""
        granted = self.buffer.take(len(data))
        if granted < len(data):
            self.cut = True  # nothing more of it is kept
        self.size += granted
        return data if granted == len(data) else data[:granted]

    def add(self, chunk: bytes) -> None:
        kept = self._kept(chunk)
        if kept:
            self.response.append(kept)

    def to_json(self) -> dict[str, Any]:
        return {
            "request": {"headers": _headers(self.request_headers), **_body(self.request)},
            "response": {"headers": _headers(self.response_headers), **_body(b"".join(self.response))},
            "bytes": self.size,
            "cut": self.cut,
        }


@dataclass(slots=True, eq=False)
class Entry:
    """One request: filled in as it goes, made JSON only when asked."""

    id: str
    at: float  # epoch seconds, when it began
    began: float  # perf_counter, when it began
    model: str | None  # None: refused before a model was named
    method: str
    route: str
    task: asyncio.Task[Any] | None
    tally: Tally = field(default_factory=Tally)
    place: str = LOCAL_NAME
    swaps: deque[Swap] | None = None  # its host's swaps, where it waited for a start
    swap: Swap | None = None
    status: int | None = None  # None while in flight
    seconds: float | None = None
    usage: bytes | None = None  # the part of a whole answer that reports its usage
    cancelled: bool = False
    capture: Capture | None = None
    error: str | None = None  # why it was refused before it was routed

    def to_json(self, capture: bool = False) -> dict[str, Any]:
        tally = self.tally
        usage = self.usage if self.usage is not None else tally.usage
        first = None if tally.first is None else tally.first - self.began
        speed = _number(_PREDICTED_SPEED, usage)
        seconds = self.seconds if self.seconds is not None else time.perf_counter() - self.began
        if speed is None and tally.tokens and first is not None and seconds > first and self.usage is None:
            speed = tally.tokens / (seconds - first)  # a stream: from its first chunk to its end
        prompt = _number(_PROMPT, usage)
        found: dict[str, Any] = {
            "id": self.id,
            "at": self.at,
            "model": self.model,
            "method": self.method,
            "route": self.route,
            "status": self.status,
            "in_flight": self.status is None,
            "seconds": round(seconds, 6),
            "first_byte_seconds": None if first is None else round(first, 6),
            "prompt_tokens": None if prompt is None else int(prompt),
            "completion_tokens": tally.tokens,
            "tokens_per_s": None if speed is None else round(speed, 3),
            "prompt_tokens_per_s": _number(_PROMPT_SPEED, usage),
            "place": self.place,
            "swap": None if self.swap is None else self.swap.to_json(),
            "cancelled": self.cancelled,
            "captured": self.capture is not None,
            "error": self.error,
        }
        if capture:
            found["capture"] = None if self.capture is None else self.capture.to_json()
        return found


class Requests:
    """The record: the last `requestRecord` requests ended, those in flight, their captures.
    Sizes are read from the config as each request begins (a reload changes them)."""

    def __init__(self, config: Callable[[], Config], activity: Activity) -> None:
        self.config, self.activity = config, activity
        self.ended: deque[Entry] = deque(maxlen=0)
        self.flying: dict[str, Entry] = {}
        self.captures = Captures(0)
        self.count = 0

    # --- the hot path ---------------------------------------------------------------------

    def begin(self, model: str, scope: Scope, body: bytes) -> Entry | None:
        """A request for `model` begins, in its own task (the one a cancel cancels)."""
        config = self.config()
        if not self._keep(config.request_record):
            return None
        entry = self._entry(model, scope, time.perf_counter(), asyncio.current_task())
        limit = config.capture_buffer * 2**20
        if limit != self.captures.limit:  # a reload changed it
            self.captures.limit = limit
            self.captures.take(0)
        if limit:
            entry.capture = Capture(self.captures, scope["headers"], body)
            entry.tally.keep = entry.capture.add
        self.flying[entry.id] = entry
        CURRENT.set(entry)
        return entry

    def refused(self, scope: Scope, model: str | None, status: int, error: str, began: float) -> None:
        """A request refused before it was routed (begun at `began`, perf_counter): the name
        it gave, if any, its status and why, as its client was told."""
        if not self._keep(self.config().request_record):
            return
        entry = self._entry(model, scope, began, None)
        entry.status, entry.seconds, entry.error = status, time.perf_counter() - began, error
        self._ended(entry)

    def _keep(self, keep: int) -> bool:
        """Whether the record keeps any request (its size, `keep`, as the config says now)."""
        if keep != self.ended.maxlen:
            self.ended = deque(self.ended, maxlen=keep)
        return keep > 0

    def _entry(self, model: str | None, scope: Scope, began: float, task: asyncio.Task[Any] | None) -> Entry:
        self.count += 1
        at = time.time() - (time.perf_counter() - began)
        method = scope.get("method", "GET")  # a WebSocket's scope has none: its handshake is a GET
        return Entry(str(self.count), at, began, model, method, scope["path"], task)

    def _ended(self, entry: Entry) -> None:
        self.ended.append(entry)
        if self.activity.subscriptions:
            self.activity.publish("request", entry.to_json())

    def went(self, place: str, swaps: deque[Swap] | None = None) -> None:
        """Where the request in flight went; `swaps`: its host's, where it waits for a start."""
        entry = CURRENT.get()
        if entry is not None:
            entry.place, entry.swaps = place, swaps

    def tally(self, headers: RawHeaders) -> Tally:
        """What a streamed answer tallies as it passes: the request's, else a new one."""
        entry = CURRENT.get()
        if entry is None or entry.status is not None:
            return Tally()
        if entry.capture is not None:
            entry.capture.response_headers = _kept_headers(headers)
        return entry.tally

    def whole(self, headers: RawHeaders, body: bytes) -> None:
        """A whole answer came: its head's time, its usage, its capture."""
        entry = CURRENT.get()
        if entry is None or entry.status is not None:
            return
        entry.tally.first = time.perf_counter()
        entry.usage = body[-USAGE_TAIL:] if b"_tokens" in body or b'"timings"' in body else None
        if entry.capture is not None:
            entry.capture.response_headers = _kept_headers(headers)
            entry.capture.add(body)

    def end(self, model: str, status: int, tokens: int | None = None) -> Entry | None:
        """The request in flight for `model` ended with `status` (499 if it was cancelled),
        its answer reporting `tokens`."""
        entry = CURRENT.get()
        if entry is None or entry.status is not None or entry.model != model:
            return None
        CURRENT.set(None)
        if tokens is not None:
            entry.tally.tokens = tokens
        entry.seconds = time.perf_counter() - entry.began
        entry.status = CANCELLED if entry.cancelled else status
        entry.task = None
        if entry.swaps is not None:
            entry.swap = next(
                (s for s in reversed(entry.swaps) if s.model == model and s.at >= entry.at), None
            )
            entry.swaps = None
        self.flying.pop(entry.id, None)
        if entry.capture is not None:
            self.captures.finished.append(entry)
        self._ended(entry)
        return entry

    def cancelled(self) -> Entry | None:
        """The request of this task, if a cancel of it is what cancelled it: the cancel taken
        back, so that it can be answered."""
        entry = CURRENT.get()
        if entry is None or not entry.cancelled or entry.status is not None:
            return None
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            task.uncancel()
        return entry

    # --- reading and cancelling -----------------------------------------------------------

    def find(self, id: str) -> Entry:
        found = self.flying.get(id) or next((e for e in self.ended if e.id == id), None)
        if found is None:
            raise RequestError(404, f"no request '{id}' on record (it may have been dropped)", "not_found")
        return found

    def cancel(self, id: str) -> Entry:
        entry = self.flying.get(id)
        if entry is None:
            self.find(id)
            raise RequestError(409, f"request '{id}' has ended: there is nothing to cancel", "request_ended")
        if not entry.cancelled and entry.task is not None:
            entry.cancelled = True
            entry.task.cancel()
        return entry

    def listed(self, model: str | None, limit: int | None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for entry in [*self.flying.values(), *self.ended][::-1]:  # newest first
            if limit is not None and len(found) >= limit:
                break
            if model is None or entry.model == model:
                found.append(entry.to_json())
        return found

    # --- routes ---------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route("/requests", self.list_route, methods=["GET"]),
            Route("/requests/{id}", self.one_route, methods=["GET"]),
            Route("/requests/{id}/cancel", self.cancel_route, methods=["POST"]),
        ]

    async def list_route(self, request: Request) -> Response:
        """`{"requests": [...]}`, newest first (those in flight included); `?model=` (an
        ID, alias or variant), `?limit=`."""
        name = request.query_params.get("model")
        model = self.config().resolve(name) or name if name else None
        text = request.query_params.get("limit")
        limit = None
        if text is not None:
            if not text.isdigit():
                raise RequestError(
                    400, f"'limit' is a whole number of requests, got {text!r}", "invalid_value"
                )
            limit = int(text)
        return JSONResponse({"requests": self.listed(model, limit)})

    async def one_route(self, request: Request) -> Response:
        """One request with its capture (`capture`: null where none is kept)."""
        return JSONResponse(self.find(request.path_params["id"]).to_json(capture=True))

    async def cancel_route(self, request: Request) -> Response:
        entry = self.cancel(request.path_params["id"])
        return JSONResponse(entry.to_json(), 202)
