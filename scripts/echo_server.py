"""An OpenAI-shaped test server, standard library only, for the routes llama-server lacks.

It answers each route with what the official `openai` client parses for it, and tells the
test what it received: the `model` it was sent (so a rewrite by `useModelName` shows), and
the size and SHA-256 of uploaded files (so an upload that went through untouched shows).

Runs in the test image (`python3 /srv/echo_server.py --port 8080`, this folder mounted at
/srv). HTTP/1.1 with keep-alive: every answer has a Content-Length or is chunked, and every
request body is read in full (Content-Length or chunked) before answering.

| route | answer |
|---|---|
| GET /health | 200 {"status": "ok"} |
| POST /v1/embeddings | one vector per input, from its SHA-256; base64 if `encoding_format` says so |
| POST /v1/responses | a Response whose text names the model and echoes the input; SSE with `stream` |
| POST /v1/audio/speech | `speech_bytes(model, input)`, chunked in several writes, audio/mpeg |
| POST /v1/audio/transcriptions, /v1/audio/translations | {"text": "<model> <bytes> <sha256>"} of the file |
| POST /v1/images/generations | {"created", "data": [{"b64_json", "revised_prompt": "<model>: <prompt>"}]} |
| POST /v1/images/edits | multipart; the same, revised_prompt "<model> <bytes> <sha256>" of the image |
| POST /v1/rerank, /v1/reranking, /rerank | {"model", "results": [{"index", "relevance_score", "document"}]} |
| anything else | {"method", "path", "query", "bytes", "sha256", "content_type", "json"}; gzip with `?gzip=1` |
"""

from __future__ import annotations

import argparse
import array
import base64
import contextlib
import gzip
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

EMBEDDING_SIZE = 16
SPEECH_CHUNKS = 8  # writes per speech answer
# A 1x1 PNG, the image every image route returns.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


class ClientError(Exception):
    """A bad request: answered 400 with an OpenAI error body."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def speech_bytes(model: str, text: str) -> bytes:
    """The audio /v1/audio/speech returns: an ID3 tag, then 128 KiB derived from model and text."""
    block = hashlib.sha256(f"{model}\n{text}".encode()).digest()
    return b"ID3\x04\x00\x00\x00\x00\x00\x00" + block * (128 * 1024 // len(block))


def embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [(b - 127.5) / 127.5 for b in digest[:EMBEDDING_SIZE]]


def relevance(query: str, document: str) -> float:
    """The share of the query's words found in the document."""
    words = set(query.lower().split())
    return len(words & set(document.lower().split())) / max(1, len(words))


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart/form-data body (RFC 7578), binary-safe: split at the
    delimiters by hand, each part's headers read with the email package."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_boundary()
    if not boundary:
        raise ClientError("multipart body without a boundary")
    delimiter = b"--" + boundary.encode("latin-1")
    # the first delimiter starts the body or a line; later ones follow a CRLF that is theirs
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        found = body.find(b"\r\n" + delimiter)
        if found < 0:
            raise ClientError("multipart body without its first boundary")
        position = found + 2 + len(delimiter)
    parts: list[Part] = []
    while True:
        if body[position : position + 2] == b"--":
            return parts  # the close delimiter
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise ClientError("multipart body cut off after a boundary")
        headers_end = body.find(b"\r\n\r\n", line_end)
        if headers_end == line_end:  # a part with no headers at all
            headers_raw, data_start = b"", line_end + 4
        elif headers_end < 0:
            raise ClientError("multipart part without the end of its headers")
        else:
            headers_raw, data_start = body[line_end + 2 : headers_end], headers_end + 4
        data_end = body.find(b"\r\n" + delimiter, data_start)
        if data_end < 0:
            raise ClientError("multipart body without its close delimiter")
        headers = BytesHeaderParser().parsebytes(headers_raw + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise ClientError("multipart part without a name")
        parts.append(
            Part(name, headers.get_filename(), headers.get("content-type"), body[data_start:data_end])
        )
        position = data_end + 2 + len(delimiter)


def form_fields(parts: list[Part]) -> dict[str, str]:
    return {p.name: p.data.decode("utf-8", "replace") for p in parts if p.filename is None}


def form_files(parts: list[Part]) -> list[Part]:
    return [p for p in parts if p.filename is not None]


def json_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClientError(f"the body is not JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ClientError("the body is not a JSON object")
    return payload


def text_of(value: Any) -> str:
    """A Responses API `input`: a string, or items whose text parts are joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(item) for item in value)
    if isinstance(value, dict):
        for key in ("content", "text"):
            if key in value:
                return text_of(value[key])
    return ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "echo-server/1"
    # TCP_NODELAY on each accepted connection (StreamRequestHandler.setup): headers and body
    # go out in separate writes, and with Nagle's algorithm the body then waits for the
    # client's delayed ACK, about 40 ms per answer on loopback.
    disable_nagle_algorithm = True

    # -- reading ---------------------------------------------------------------------

    def _body(self) -> bytes:
        """The whole request body: Content-Length, or chunked; none without either."""
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = self.rfile.readline(65537)
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise ClientError(f"bad chunk size line {size_line!r}") from None
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)  # the CRLF after the chunk
        length = self.headers.get("content-length")
        return self.rfile.read(int(length)) if length else b""

    # -- writing ---------------------------------------------------------------------

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _chunked(
        self, chunks: Iterable[bytes], content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        """A 200 with Transfer-Encoding: chunked, one chunk per item, each flushed."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        for chunk in chunks:
            if chunk:  # an empty chunk would end the body
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _error(self, status: int, message: str) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._json({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)

    # -- dispatch --------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        routes: dict[str, Callable[[bytes], None]] = {
            "/v1/embeddings": self.route_embeddings,
            "/v1/responses": self.route_responses,
            "/v1/audio/speech": self.route_speech,
            "/v1/audio/transcriptions": self.route_transcription,
            "/v1/audio/translations": self.route_transcription,
            "/v1/images/generations": self.route_image_generation,
            "/v1/images/edits": self.route_image_edit,
            "/v1/rerank": self.route_rerank,
            "/v1/reranking": self.route_rerank,
            "/rerank": self.route_rerank,
        }
        try:
            body = self._body()  # read in full whatever the route, to keep the connection usable
        except ClientError as error:
            self.close_connection = True  # where the next request starts is unknown
            self._error(400, str(error))
            return
        try:
            if self.command == "GET" and url.path == "/health":
                self._json({"status": "ok"})
            elif self.command == "POST" and url.path in routes:
                routes[url.path](body)
            else:
                self.route_echo(body, url.path, url.query)
        except ClientError as error:
            self._error(400, str(error))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_HEAD = _dispatch

    # -- routes ----------------------------------------------------------------------

    def _form(self, body: bytes) -> tuple[dict[str, str], list[Part]]:
        content_type = self.headers.get("content-type", "")
        if not content_type.startswith("multipart/form-data"):
            raise ClientError(f"expected multipart/form-data, got {content_type!r}")
        parts = parse_multipart(body, content_type)
        return form_fields(parts), form_files(parts)

    def route_embeddings(self, body: bytes) -> None:
        request = json_object(body)
        inputs = request.get("input")
        texts = [inputs] if isinstance(inputs, str) else [str(i) for i in inputs or []]
        data: list[dict[str, Any]] = []
        for index, text in enumerate(texts):
            vector: Any = embedding(text)
            if request.get("encoding_format") == "base64":
                vector = base64.b64encode(array.array("f", vector).tobytes()).decode()
            data.append({"object": "embedding", "index": index, "embedding": vector})
        tokens = sum(len(t.split()) for t in texts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._json({"object": "list", "model": request.get("model"), "data": data, "usage": usage})

    def route_responses(self, body: bytes) -> None:
        request = json_object(body)
        model = str(request.get("model"))
        text = f"{model} heard: {text_of(request.get('input'))}"
        message = {
            "type": "message",
            "id": "msg_echo",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        response: dict[str, Any] = {
            "id": "resp_echo",
            "object": "response",
            "created_at": int(time.time()),
            "completed_at": int(time.time()),
            "model": model,
            "status": "completed",
            "output": [message],
            "parallel_tool_calls": False,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": 1,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(text.split()),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 1 + len(text.split()),
            },
        }
        if not request.get("stream"):
            self._json(response)
            return

        def events() -> Iterator[bytes]:
            started = {**response, "status": "in_progress", "output": [], "completed_at": None}
            sequence: list[dict[str, Any]] = [
                {"type": "response.created", "response": started},
                *(
                    {
                        "type": "response.output_text.delta",
                        "item_id": "msg_echo",
                        "output_index": 0,
                        "content_index": 0,
                        "delta": word,
                        "logprobs": [],
                    }
                    for word in text.split(" ")
                ),
                {"type": "response.completed", "response": response},
            ]
            for number, event in enumerate(sequence):
                event["sequence_number"] = number
                yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()

        self._chunked(events(), "text/event-stream")

    def route_speech(self, body: bytes) -> None:
        request = json_object(body)
        audio = speech_bytes(str(request.get("model")), str(request.get("input")))
        step = -(-len(audio) // SPEECH_CHUNKS)
        chunks = (audio[i : i + step] for i in range(0, len(audio), step))
        self._chunked(chunks, "audio/mpeg", {"X-Echo-Model": str(request.get("model"))})

    def route_transcription(self, body: bytes) -> None:
        fields, files = self._form(body)
        uploads = [p for p in files if p.name == "file"]
        if len(uploads) != 1:
            raise ClientError(f"expected one 'file' part, got {[p.name for p in files]}")
        text = f"{fields.get('model')} {len(uploads[0].data)} {sha256(uploads[0].data)}"
        if fields.get("response_format", "json") in ("text", "srt", "vtt"):
            self._send(200, text.encode(), "text/plain; charset=utf-8")
        else:
            self._json({"text": text})

    def route_image_generation(self, body: bytes) -> None:
        request = json_object(body)
        self._image(f"{request.get('model')}: {request.get('prompt')}", int(request.get("n") or 1))

    def route_image_edit(self, body: bytes) -> None:
        fields, files = self._form(body)
        images = [p for p in files if p.name in ("image", "image[]")]
        if not images:
            raise ClientError(f"expected an 'image' part, got {[p.name for p in files]}")
        data = b"".join(p.data for p in images)
        self._image(f"{fields.get('model')} {len(data)} {sha256(data)}", int(fields.get("n") or 1))

    def _image(self, revised_prompt: str, n: int) -> None:
        image = {"b64_json": base64.b64encode(PNG_1X1).decode(), "revised_prompt": revised_prompt}
        self._json({"created": int(time.time()), "data": [image] * n})

    def route_rerank(self, body: bytes) -> None:
        request = json_object(body)
        query = str(request.get("query", ""))
        documents = [d if isinstance(d, str) else text_of(d) for d in request.get("documents") or []]
        results: list[dict[str, Any]] = [
            {"index": i, "relevance_score": relevance(query, d), "document": {"text": d}}
            for i, d in enumerate(documents)
        ]
        results.sort(key=lambda r: (-r["relevance_score"], r["index"]))
        top_n = request.get("top_n")
        if isinstance(top_n, int):
            results = results[:top_n]
        tokens = len(query.split()) + sum(len(d.split()) for d in documents)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        self._json({"id": "rerank-echo", "model": request.get("model"), "results": results, "usage": usage})

    def route_echo(self, body: bytes, path: str, query: str) -> None:
        """What was asked; gzip-compressed with `gzip=1` in the query, if the client accepts it."""
        payload = {
            "method": self.command,
            "path": path,
            "query": query,
            "bytes": len(body),
            "sha256": sha256(body),
            "content_type": self.headers.get("content-type"),
            "json": None,  # a JSON body, as received: what the proxy's filters made of it
        }
        if (self.headers.get("content-type") or "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                payload["json"] = json.loads(body)
        answer = json.dumps(payload).encode()
        if "gzip=1" in query.split("&") and "gzip" in self.headers.get("accept-encoding", ""):
            self._send(200, gzip.compress(answer), "application/json", {"Content-Encoding": "gzip"})
        else:
            self._send(200, answer, "application/json")

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # not 5: a proxy opening 32 connections at once overflows that


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    server = Server((args.host, args.port), Handler)
    print(f"echo server listening on {args.host}:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
