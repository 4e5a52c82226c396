"""Loading feedback: a streamed request whose model is not ready gets its response at once.

The head goes out before the wait (200, an event stream), then a note of progress every
`tick` seconds while the model starts, then the model's own events in the same body:

- by default an SSE comment, `: loading MODEL 3.2s` (`, pulling image IMAGE: 120/450 MB`
  while its image is pulled), which clients ignore and which keeps reverse proxies from
  timing out an idle response;
- with `sendLoadingState`, on /v1/chat/completions, `reasoning_content` deltas of chat
  completion chunks, which chat UIs show as thinking: the image's pull and its bytes, what
  is evicted, the container starting, the seconds as they pass, an estimate from the model's
  last starts.

The status is sent before the wait, so what goes wrong after it (a failed start, an upstream
answer other than 200) ends the stream with an error event, which OpenAI's clients raise (and
Anthropic's, on `/v1/messages`, where it is Anthropic's `event: error`; its clients ignore the
comments). A client that leaves cancels the wait and releases its place in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from swapctl.backend import Pulled
from swapctl.lifecycle import Lease, Progress, Step, Ticket
from swapctl.proxy.errors import error_answer, error_body, error_event, shutting_down
from swapctl.proxy.record import cancelled_error
from swapctl.proxy.upstream import Answer, UpstreamError

if TYPE_CHECKING:
    from swapctl.proxy.forwarding import Call, Forwarder

log = logging.getLogger("swapctl")
HEAD = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each note at once
]
GONE = 499  # counted for a client that left before its answer began
REFUSAL_BYTES = 4096  # of an upstream's error body: read, and quoted in the error event


class Voice(Protocol):
    """How a stream tells its client about the wait."""

    def waiting(self, progress: Progress | None, waited: float) -> bytes: ...

    def ready(self, waited: float) -> bytes: ...


class Comments:
    """SSE comment lines: every client ignores them; proxies see bytes flow."""

    def __init__(self, model: str) -> None:
        self.model = model

    def waiting(self, progress: Progress | None, waited: float) -> bytes:
        elapsed = progress.elapsed if progress else waited
        pull = pulling(progress)
        note = f", pulling image {pull.image}: {pull.sizes}" if pull else ""
        return f": loading {self.model} {elapsed:.1f}s{note}\n\n".encode()

    def ready(self, waited: float) -> bytes:
        return b""


STEPS = {
    Step.PULLING: "Pulling its image…",
    Step.WAKING: "Waking it from sleep…",
    Step.STARTING: "Starting its container…",
    Step.LOADING: "Its container runs; waiting for the model to load…",
}
ORDER = list(Step)  # a start goes through its steps in this order


def told(step: Step, progress: Progress) -> bool:
    """Whether a step of this start has a line: a pull once it began, evictions if any, a
    wake if it wakes a sleeping container."""
    if step is Step.PULLING:
        return progress.pulled is not None
    if step is Step.WAKING:
        return progress.waking
    return step is not Step.EVICTING or bool(progress.evicting)


def pulling(progress: Progress | None) -> Pulled | None:
    """How far the pull of the model's image has come, while it is pulled."""
    return progress.pulled if progress is not None and progress.step is Step.PULLING else None


def estimate(progress: Progress) -> str:
    """`about 4s (last starts 3.8s, 4.1s)`, from the model's last measured starts (or wakes)."""
    what = "wake" if progress.waking else "start"
    if progress.estimate is None:
        return f"no {what} of it measured yet, so no estimate"
    last = ", ".join(f"{seconds:.1f}s" for seconds in progress.last_starts)
    return f"about {progress.estimate:.0f}s (last {what}s {last})"


class Reasoning:
    """`reasoning_content` deltas of chat completion chunks: a line for each step of the
    start, the seconds appended to it as they pass (a delta can only add text)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id = f"chatcmpl-swapctl-{secrets.token_hex(8)}"
        self.created = int(time.time())
        self.step: Step | None = None
        self.said = False

    def waiting(self, progress: Progress | None, waited: float) -> bytes:
        text, first = "", not self.said
        if first:
            self.said = True
            text = f"Loading {self.model}" + (f": {estimate(progress)}." if progress else ".")
        if progress is not None and progress.step is not self.step:
            text += "".join("\n" + self._line(progress, step) for step in self._since(progress, first))
            if told(progress.step, progress):  # a pull is said once it begins
                self.step = progress.step
        elapsed = progress.elapsed if progress else waited
        pull = pulling(progress)
        return self._chunk(f"{text} {pull.sizes if pull else f'{elapsed:.1f}s'}")

    def ready(self, waited: float) -> bytes:
        return self._chunk(f"\n{self.model} is ready after {waited:.1f}s.\n\n")

    def _since(self, progress: Progress, first: bool) -> list[Step]:
        """The steps to tell: every one since the last told, even one too short for a note of
        its own. The first note tells only the current one (it may join a start under way);
        after a look for the image that pulled nothing, those since the start began."""
        now = ORDER.index(progress.step)
        begin = ORDER.index(self.step) + 1 if self.step else now if first else 0
        return [step for step in ORDER[begin : now + 1] if told(step, progress)]

    def _line(self, progress: Progress, step: Step) -> str:
        if step is Step.EVICTING:
            return f"Stopping {', '.join(progress.evicting)} to make room…"
        if step is Step.PULLING and progress.pulled is not None:
            return f"Pulling image {progress.pulled.image}…"
        return STEPS[step]

    def _chunk(self, text: str) -> bytes:
        delta = {"role": "assistant", "reasoning_content": text}
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()


def refusal(model: str, status: int, body: bytes) -> dict[str, Any]:
    """The OpenAI error event for an upstream answer other than 200: its status and message."""
    message = body[:REFUSAL_BYTES].decode(errors="replace").strip()
    try:
        found = json.loads(body)
    except (ValueError, RecursionError):
        found = None
    error = found.get("error") if isinstance(found, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
    elif isinstance(error, str):
        message = error
    kind = "invalid_request_error" if status < 500 else "server_error"
    event = error_body(
        f"model '{model}': its server answered {status}: {message}", kind, f"upstream_{status}"
    )
    event["error"]["status"] = status
    return event


class Loading(StreamingResponse):
    """The response of a streamed request that waits for its model: the head at once, notes
    of progress every `tick` seconds, then the upstream's answer. Whatever ends it (the
    answer, an error, the client leaving), the wait is cancelled, the upstream answer
    closed, the request's hold released, and its final status counted."""

    def __init__(
        self,
        forwarder: Forwarder,
        ticket: Ticket,
        call: Call,
        began: float,
        *,
        path: str,
        tick: float,
        reasoning: bool,
    ) -> None:
        """`path`: the route's, whose clients' error events it speaks."""
        self.forwarder, self.ticket, self.call, self.began, self.tick = forwarder, ticket, call, began, tick
        self.path = path
        self.model = ticket.model
        self.voice: Voice = Reasoning(self.model) if reasoning else Comments(self.model)
        self.opening: asyncio.Task[tuple[Lease, Answer]] | None = None
        self.outcome: int | None = None  # the status to count; None while it waits
        self.tally = forwarder.requests.tally(())  # the tokens the answer reports
        super().__init__(self._body())
        self.raw_headers = list(HEAD)

    async def _body(self) -> AsyncIterator[bytes]:
        opening = self.opening = asyncio.get_running_loop().create_task(
            self.forwarder.open(self.ticket, self.call)
        )
        try:
            while True:
                owner = self.ticket.owner or self.forwarder.swapper  # the host's swapper that starts it
                yield self.voice.waiting(owner.progress(self.model), self._waited())
                await asyncio.wait({opening}, timeout=self.tick)
                if opening.done():
                    break
            try:
                lease, answer = opening.result()
            except Exception as error:  # the start failed, or the model's server did not answer
                self.outcome, body = error_answer(error)
                yield error_event(self.path, self.outcome, body)
                return
            self.outcome = answer.status
            if answer.status != 200:
                yield error_event(self.path, answer.status, await self._refusal(answer))
                return
            ready = self.voice.ready(self._waited())
            if ready:
                yield ready
            async for chunk in self.forwarder.relay(answer, lease, self.path, self.tally):
                yield chunk
        finally:
            opening.cancel()  # no await here: a cancelled stream may not wait; __call__ settles

    def _waited(self) -> float:
        return time.perf_counter() - self.began

    async def _refusal(self, answer: Answer) -> dict[str, Any]:
        body = b""
        with contextlib.suppress(UpstreamError):  # a refusal cut short is quoted as far as it came
            async for chunk in answer.chunks():
                body += chunk
                if len(body) >= REFUSAL_BYTES:
                    break
        return refusal(self.model, answer.status, body)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # an ASGI 2.4 server says so at the next write
            pass
        except asyncio.CancelledError:
            if (cancelled := self.forwarder.requests.cancelled()) is not None:
                error: Exception = cancelled_error(self.model, cancelled.id)  # POST /requests/<id>/cancel
            elif (shutdown := shutting_down(self.model)) is not None:
                error = shutdown
            else:
                raise
            await self._end(send, error)
        finally:
            await self._settle()
            if self.outcome is None:
                log.info("%s %s: the client went away (%s)", scope["method"], scope["path"], self.model)
            outcome = GONE if self.outcome is None else self.outcome
            self.forwarder.record(self.model, outcome, self.began, self.tally.tokens)

    async def _end(self, send: Send, error: Exception) -> None:
        """The stream ended by `error`, in an error event, where the body was cut short."""
        self.outcome, body = error_answer(error)
        event = error_event(self.path, self.outcome, body)
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _settle(self) -> None:
        """The wait over (cancelled if it still ran), the answer closed, every hold released."""
        opening = self.opening
        if opening is not None:
            opening.cancel()
            await asyncio.wait({opening})
            if not opening.cancelled() and opening.exception() is None:
                lease, answer = opening.result()
                await answer.close()
                await lease.release()
        await self.ticket.release()  # nothing once it became a lease
