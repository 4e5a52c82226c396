"""PURE: a log's bytes, as they come in chunks, cut into lines.

A line longer than LONGEST_LINE bytes keeps its first LONGEST_LINE and a mark saying how
long it was; the rest is counted and dropped as it arrives, so a line of any length without
a newline costs one pass over its bytes and LONGEST_LINE of memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

LONGEST_LINE = 16 * 1024  # bytes


def split_lines(chunks: Iterable[bytes], longest: int = LONGEST_LINE) -> Iterator[str]:
    """The lines in `chunks` (UTF-8, undecodable bytes replaced), an over-long one cut and
    marked `[cut: N bytes]`; the last line even without its newline."""
    kept: list[bytes] = []  # the line so far, at most `longest` bytes
    room, length = longest, 0  # bytes the line may still keep; its bytes so far
    for chunk in chunks:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0 or start < len(chunk):
            stop = end if end >= 0 else len(chunk)
            if room > 0:
                kept.append(chunk[start : min(stop, start + room)])
                room -= len(kept[-1])
            length += stop - start
            if end < 0:
                break
            yield _line(kept, length, longest)
            kept, room, length, start = [], longest, 0, end + 1
    if length:
        yield _line(kept, length, longest)


def _line(kept: list[bytes], length: int, longest: int) -> str:
    text = b"".join(kept).decode(errors="replace")
    return f"{text} [cut: {length} bytes]" if length > longest else text
