"""Docker's times, as its inspect writes them, in epoch seconds."""

from __future__ import annotations

import pytest

from swapctl.backend.docker import _epoch

BASE = 1796450187.0  # 2026-12-05T05:56:27Z


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2026-12-05T05:56:27.123456789Z", BASE + 0.123456789),
        ("2026-12-05T05:56:27.12345Z", BASE + 0.12345),  # trailing zeros of the fraction dropped
        ("2026-12-05T05:56:27.1Z", BASE + 0.1),
        ("2026-12-05T05:56:27Z", BASE),  # no fraction at all
        ("2026-12-05T06:56:27.5+01:00", BASE + 0.5),
    ],
)
def test_a_start_time_in_any_of_dockers_shapes_is_read(text: str, seconds: float) -> None:
    assert _epoch(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "0001-01-01T00:00:00Z", "yesterday"])
def test_the_zero_time_and_nonsense_are_none(text: str | None) -> None:
    assert _epoch(text) is None
