"""A test server with vLLM's sleep mode, standard library only.

It answers the routes of vLLM's OpenAI server that swapctl uses to put a model to sleep and
wake it, as vLLM documents them. The development routes exist only when its command line
has `--enable-sleep-mode` and its environment VLLM_SERVER_DEV_MODE=1, as with vLLM;
otherwise they answer 404.

Runs in the test image (`python3 /srv/sleep_server.py --port 8080 --enable-sleep-mode`, this
folder mounted at /srv).

| route | answer |
|---|---|
| GET /health | 200 |
| GET /v1/models | the model list, one model (`--model`) |
| POST /v1/chat/completions | names the model sent; 503 asleep; 500 woken from level 2 unreloaded |
| POST /sleep?level=1\\|2 | 200 once asleep (after `--sleep-delay` seconds) |
| POST /wake_up[?tags=weights\\|kv_cache] | 200 once those parts are awake (after `--wake-delay`) |
| POST /collective_rpc {"method": "reload_weights"} | 200: the weights a level 2 sleep discarded are back |
| GET /is_sleeping | {"is_sleeping": true\\|false}: true until every part is awake |
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TAGS = ("weights", "kv_cache")  # what vLLM can wake apart


class Engine:
    """What sleeps: the set of parts asleep, and how long a sleep or a wake takes."""

    def __init__(self, model: str, sleep_delay: float, wake_delay: float) -> None:
        self.model, self.sleep_delay, self.wake_delay = model, sleep_delay, wake_delay
        self.asleep: set[str] = set()
        self.level: int | None = None
        self.wakes = 0  # times it woke up whole
        self.weights_lost = False  # a level 2 sleep discarded them; reload_weights brings them back
        self.lock = threading.Lock()

    def sleep(self, level: int) -> None:
        time.sleep(self.sleep_delay)
        with self.lock:
            self.asleep, self.level = set(TAGS), level
            self.weights_lost = self.weights_lost or level == 2

    def wake(self, tags: list[str]) -> None:
        time.sleep(self.wake_delay)
        with self.lock:
            self.asleep -= set(tags or TAGS)
            if self.asleep == set() and self.level is not None:
                self.level, self.wakes = None, self.wakes + 1

    @property
    def sleeping(self) -> bool:
        with self.lock:
            return bool(self.asleep)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sleep-server/1"
    disable_nagle_algorithm = True
    server: Server

    def _send(self, status: int, body: Any = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            return None

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "error", "code": status}})

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        engine = self.server.engine
        if path == "/health":
            self._send(200)
        elif path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": engine.model, "object": "model"}]})
        elif path == "/is_sleeping" and self.server.dev_routes:
            self._send(200, {"is_sleeping": engine.sleeping})
        else:
            self._error(404, "Not Found")

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        engine = self.server.engine
        body = self._body()  # read in full: the connection is kept alive
        if url.path == "/v1/chat/completions":
            self._chat(body)
        elif url.path == "/sleep" and self.server.dev_routes:
            engine.sleep(int(query.get("level", ["1"])[0]))
            self._send(200)
        elif url.path == "/wake_up" and self.server.dev_routes:
            engine.wake(query.get("tags", []))
            self._send(200)
        elif url.path == "/collective_rpc" and self.server.dev_routes:
            if not isinstance(body, dict) or body.get("method") != "reload_weights":
                self._error(400, "only reload_weights is known here")
                return
            engine.weights_lost = False
            self._send(200, {"results": [None]})
        else:
            self._error(404, "Not Found")

    def _chat(self, body: Any) -> None:
        engine = self.server.engine
        if engine.sleeping:
            self._error(503, f"{engine.model} is asleep")
            return
        if engine.weights_lost:
            self._error(500, f"{engine.model} woke from a level 2 sleep without reloading its weights")
            return
        model = body.get("model", "") if isinstance(body, dict) else ""
        text = f"{model} answers, awake (woken {engine.wakes} times)"
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5}
        answer = {
            "id": "chatcmpl-sleep",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage,
        }
        self._send(200, answer)

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], engine: Engine, dev_routes: bool) -> None:
        super().__init__(address, Handler)
        self.engine, self.dev_routes = engine, dev_routes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--model", default="sleepy")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--sleep-delay", type=float, default=0.0, help="seconds a /sleep takes")
    parser.add_argument("--wake-delay", type=float, default=0.0, help="seconds a /wake_up takes")
    args = parser.parse_args(argv)
    dev_routes = args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1"
    engine = Engine(args.model, args.sleep_delay, args.wake_delay)
    server = Server((args.host, args.port), engine, dev_routes)
    routes = "with" if dev_routes else "without"
    print(
        f"sleep server listening on {args.host}:{args.port}, {routes} sleep mode", file=sys.stderr, flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
