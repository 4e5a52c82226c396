"""A model's `timeouts` on the real path: `swapctl up`, its HTTP/1.1 client, and a model
server in a real container (python3's standard library, in the llama-server image) that
misbehaves on purpose, asked through the official `openai` SDK.

- `silent` reads a request and never answers: the client gets a 504 naming the model
  within its `responseHeader`, also when the request is a stream that waited for the start;
- `stall` sends a head and two events, then nothing, its connection left open: the stream
  ends with an error event (the SDK raises its APIError) after its `idle`;
- `slow` pauses seconds before its head and between its events: the defaults let it be.

Each server counts the connections the proxy closed under it: a timed-out connection is
closed, never reused. The model stays up throughout."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import MESSAGES, Proxy, config_document, poll, write_yaml

pytestmark = pytest.mark.docker

SERVER = r"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = sys.argv[1]
closed = 0  # connections the client closed while this server held an answer back
lock = threading.Lock()


def event(text):
    delta = {"content": text}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": MODE,
             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, body, kind="application/json"):
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def hold_until_closed(self):
        global closed
        try:
            self.rfile.read(1)  # nothing more comes: this returns when the client closes
        except OSError:
            pass
        with lock:
            closed += 1
        self.close_connection = True

    def do_GET(self):
        if self.path == "/closed":
            self.answer(json.dumps({"closed": closed}).encode())
        else:
            self.answer(b'{"status": "ok"}')

    def do_POST(self):
        asked = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if MODE == "silent":
            return self.hold_until_closed()
        if MODE == "slow":
            time.sleep(2)  # a prefill
        if not asked.get("stream"):
            message = {"role": "assistant", "content": "slow but sure"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            body = {"id": "c", "object": "chat.completion", "created": 0, "model": MODE, "choices": [choice]}
            return self.answer(json.dumps(body).encode())
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for word in ("one", " two"):
            self.chunk(event(word))
            if MODE == "slow":
                time.sleep(2)
        if MODE == "stall":
            return self.hold_until_closed()
        self.chunk(b"data: [DONE]\n\n")
        self.chunk(b"")

    def log_message(self, format, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""
LIMIT = "1s"


def server_model(folder: Path, mode: str, **keys: Any) -> dict[str, Any]:
    return {
        "image": "swapctl/llama-server:sid",
        "entrypoint": ["python3"],
        "command": ["/srv/server.py", mode],
        "volumes": [f"{folder}:/srv:ro"],
        "stop_grace_period": "1s",
        **keys,
    }


@pytest.fixture
def proxy(instance: str, tmp_path: Path) -> Iterator[Proxy]:
    scripts = tmp_path / "srv"
    scripts.mkdir()
    (scripts / "server.py").write_text(SERVER)
    scripts.chmod(0o755)
    models = {
        "silent": server_model(scripts, "silent", timeouts={"responseHeader": LIMIT}),
        "stall": server_model(scripts, "stall", timeouts={"idle": LIMIT}),
        "slow": server_model(scripts, "slow"),  # the defaults
    }
    matrix = {"sets": {"all": "silent & stall & slow"}}
    config = write_yaml(tmp_path / "swapctl.yaml", config_document(instance, models, matrix))
    found = Proxy(config, instance, tmp_path)
    try:
        found.start()
        yield found
    finally:
        found.close()  # before `instance` removes the containers


def closed_under(proxy: Proxy, model: str, count: int) -> Callable[[], bool]:
    """Whether `model`'s server has seen the proxy close `count` connections it held."""

    def closed() -> bool:
        response = httpx.get(f"{proxy.url}/upstream/{model}/closed", timeout=10)
        return bool(response.json()["closed"] == count)

    return closed


def stays_up(proxy: Proxy, model: str) -> None:
    """The model is still ready, and once the request's end is settled, nothing holds it."""
    poll(lambda: proxy.running()[model]["in_flight"] == 0, 30, f"{model}'s request to let it go")
    assert proxy.running()[model]["state"] == "ready"


def stream(client: openai.OpenAI, model: str) -> list[str]:
    """The content of each chunk of a streamed chat completion, up to its end or its error
    (raised, the chunks so far in `got` of the error's notes)."""
    got: list[str] = []
    try:
        for chunk in client.chat.completions.create(model=model, messages=MESSAGES, stream=True):
            got.extend(choice.delta.content or "" for choice in chunk.choices)
    except openai.APIError as error:
        error.add_note(f"chunks before it: {got!r}")
        raise
    return got


def test_a_server_that_never_answers_is_a_504_naming_the_model(proxy: Proxy) -> None:
    client = proxy.client()
    # streamed, the model not started yet: the head went out before the wait, so the limit
    # comes as an error event
    with pytest.raises(openai.APIError, match=r"model 'silent'.*within 1s.*timeouts.responseHeader"):
        stream(client, "silent")
    stays_up(proxy, "silent")
    # plain, the model ready: a 504
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="silent", messages=MESSAGES)
    assert raised.value.status_code == 504
    assert raised.value.code == "upstream_timeout"
    assert "model 'silent'" in raised.value.message and "timeouts.responseHeader" in raised.value.message
    poll(closed_under(proxy, "silent", 2), 30, "the proxy to close both connections")
    stays_up(proxy, "silent")


def test_a_stream_that_stops_mid_way_ends_with_the_error_event_after_idle(proxy: Proxy) -> None:
    client = proxy.client()
    for attempt in (1, 2):  # while the model starts, then ready
        with pytest.raises(
            openai.APIError, match=r"model 'stall'.*sent nothing for 1s.*timeouts.idle"
        ) as raised:
            stream(client, "stall")
        assert raised.value.code == "upstream_timeout"
        assert "chunks before it: ['one', ' two']" in (raised.value.__notes__ or [])
        poll(closed_under(proxy, "stall", attempt), 30, "the proxy to close the connection")
        stays_up(proxy, "stall")
    assert "stall: upstream broke off mid-response: sent nothing for 1s, its timeouts.idle" in proxy.log()


def test_a_slow_but_working_server_is_not_cut_under_the_defaults(proxy: Proxy) -> None:
    client = proxy.client()
    assert stream(client, "slow") == ["one", " two"]
    answer = client.chat.completions.create(model="slow", messages=MESSAGES)
    assert answer.choices[0].message.content == "slow but sure"
    stays_up(proxy, "slow")
