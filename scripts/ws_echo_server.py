"""A WebSocket echo server, standard library only (RFC 6455), for tests on real Docker.

Runs in the test image, which has python3 but no `websockets`
(`python3 /srv/ws_echo_server.py --port 8080`, this folder mounted at /srv).

| request | answer |
|---|---|
| GET /health | 200 {"status": "ok"} |
| any other plain request | 200 {"path": its path and query} |
| a WebSocket handshake, any path | 101; subprotocol `chat` when offered, none otherwise |
| text `whoami` | {"path", "headers", "subprotocol"}: what the handshake carried |
| text `close CODE REASON` | a close with that code and reason |
| any other message | itself, text as text, binary as binary |
| a close | the same code back, then the connection ends |
| a ping | its pong |
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import struct
from collections.abc import Mapping

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 1, 2, 8, 9, 10


def frame(opcode: int, payload: bytes) -> bytes:
    """A server's frame: final, unmasked."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 2**16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return head + payload


async def read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    """A client's frame: whether it is final, its opcode, its payload unmasked."""
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4) if second & 0x80 else b"\0\0\0\0"
    data = await reader.readexactly(size)
    return bool(first & 0x80), first & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


async def answer_http(writer: asyncio.StreamWriter, status: str, body: bytes) -> None:
    """A plain HTTP answer; the connection ends after it."""
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
    await writer.drain()


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        line, *lines = head.split("\r\n")
        path = line.split(" ")[1]
        headers = [(n.strip().lower(), v.strip()) for n, _, v in (h.partition(":") for h in lines if h)]
        found = dict(headers)
        if "websocket" not in found.get("upgrade", "").lower():
            body = {"status": "ok"} if path == "/health" else {"path": path}
            await answer_http(writer, "200 OK", json.dumps(body).encode())
            return
        offered = [p.strip() for n, v in headers if n == "sec-websocket-protocol" for p in v.split(",")]
        chosen = "chat" if "chat" in offered else None
        accept = base64.b64encode(
            hashlib.sha1(found["sec-websocket-key"].encode() + GUID, usedforsecurity=False).digest()
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + b"Sec-WebSocket-Accept: "
            + accept
            + b"\r\n"
            + (f"Sec-WebSocket-Protocol: {chosen}\r\n".encode() if chosen else b"")
            + b"\r\n"
        )
        seen = {"path": path, "headers": headers, "subprotocol": chosen}
        await echo(reader, writer, seen)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Mapping[str, object]
) -> None:
    """Messages until a close: each answered as the table says."""
    kind, parts, closing = TEXT, b"", False
    while True:
        final, opcode, payload = await read_frame(reader)
        if opcode == CLOSE:
            if not closing:  # the client's close: the same code back; else the answer to ours
                writer.write(frame(CLOSE, payload[:2]))
                await writer.drain()
            return
        if opcode == PING:
            writer.write(frame(PONG, payload))
        elif opcode in (TEXT, BINARY, 0):
            kind, parts = (opcode, payload) if opcode else (kind, parts + payload)
            if not final:
                continue
            if kind == TEXT and parts == b"whoami":
                writer.write(frame(TEXT, json.dumps(seen).encode()))
            elif kind == TEXT and parts.startswith(b"close "):
                _, code, reason = parts.split(b" ", 2)
                writer.write(frame(CLOSE, struct.pack("!H", int(code)) + reason))
                closing = True
            else:
                writer.write(frame(kind, parts))
        await writer.drain()


async def main() -> None:
    parser = argparse.ArgumentParser(description="A WebSocket echo server, for tests")
    parser.add_argument("--port", type=int, default=8080)
    port = parser.parse_args().port
    server = await asyncio.start_server(serve, "0.0.0.0", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
