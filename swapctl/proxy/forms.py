"""Find the `model` field of a multipart body while it streams, so an upload (audio, an
image) is forwarded untouched instead of being parsed and re-encoded."""

from __future__ import annotations

import re

from python_multipart import MultipartParser

_NAME = re.compile(rb'(?:^|;)\s*name="([^"]*)"', re.IGNORECASE)


class ModelField:
    """Feed chunks in order; `done` once the `model` part is complete, `value` holds it."""

    def __init__(self, boundary: bytes) -> None:
        self.value = b""
        self.done = False
        self._field = self._header = b""
        self._name: bytes | None = None
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._begin,
                "on_header_field": self._on_field,
                "on_header_value": self._on_value,
                "on_header_end": self._header_end,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        if not self.done:
            self._parser.write(chunk)

    def _begin(self) -> None:
        self._name = None

    def _on_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_value(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition" and (match := _NAME.search(self._header)):
            self._name = match.group(1)
        self._field = self._header = b""

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._name == b"model":
            self.value += data[start:end]

    def _end(self) -> None:
        if self._name == b"model":
            self.done = True


def boundary_of(content_type: str) -> bytes | None:
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    return match.group(1).encode() if match else None


def replace_model(prefix: bytes, boundary: bytes, old: bytes, new: bytes) -> bytes:
    """Rewrite the model field's value inside the bytes that hold it.

    Only headers that follow a boundary line are read, so neither a file named `model` nor
    a file whose content looks like a model field can be taken for it (the boundary never
    occurs inside a part)."""
    header = re.compile(rb"(?:\A|\r\n)--" + re.escape(boundary) + rb"[ \t]*\r\n((?:[^\r\n]+\r\n)*)\r\n")
    for part in header.finditer(prefix):
        for line in part.group(1).split(b"\r\n"):
            field, _, value = line.partition(b":")
            if field.strip().lower() == b"content-disposition" and (match := _NAME.search(value)):
                if match.group(1) != b"model":
                    break
                if not prefix.startswith(old + b"\r\n--" + boundary, part.end()):
                    return prefix
                return prefix[: part.end()] + new + prefix[part.end() + len(old) :]
    return prefix
