"""A followed Docker log, cut into lines where its bytes arrive: lines come whole across
chunks, and an over-long one is cut (and marked) at little cost, however long it runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, cast

import pytest

from swapctl.backend.docker import DockerBackend

LONGEST = 16 * 1024


class Stream:
    """The SDK's followed log: chunks of bytes as they come, and `close`."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.chunks = iter(chunks)

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        pass


class Engine:
    """Just enough of docker.DockerClient for `follow`."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.api = self
        self.chunks = chunks

    def logs(self, container_id: str, **_: Any) -> Stream:
        return Stream(self.chunks)


def followed(*chunks: bytes) -> list[str]:
    return list(DockerBackend(client=cast(Any, Engine(chunks))).follow("c"))


def test_lines_come_whole_across_chunks() -> None:
    assert followed(b"ab", b"c\nd", b"e\n\nf\xc3", b"\xa9") == ["abc", "de", "", "f\u00e9"]


@pytest.mark.timeout(10)
def test_a_huge_line_without_a_newline_is_cut_and_costs_little() -> None:
    """32 MiB in 1 KiB chunks: joined and split again at each chunk, that was minutes of CPU."""
    lines = followed(*[b"x" * 1024] * (32 * 1024), b"\nnext\n", b"y" * (LONGEST + 1))
    assert len(lines) == 3
    assert lines[0].startswith("x" * LONGEST + " [cut: ")
    assert "33554432 bytes" in lines[0] and len(lines[0]) < LONGEST + 100
    assert lines[1] == "next"
    assert lines[2].startswith("y" * LONGEST + " [cut: ") and "16385 bytes" in lines[2]


def test_a_line_of_exactly_the_limit_is_whole() -> None:
    assert followed(b"z" * LONGEST + b"\n") == ["z" * LONGEST]
