"""A pull's reports as the engine streams them: read into values, summed over layers, shown
in bytes; a failure's message."""

from __future__ import annotations

from typing import Any

import pytest

from swapctl.backend import LayerReport, Pulled, PullTally
from swapctl.backend.docker import pull_failure, pull_report
from swapctl.backend.progress import sizes


@pytest.mark.parametrize(
    ("line", "report"),
    [
        (
            {"status": "Pulling from swapctl/llama-server", "id": "pull-test"},
            LayerReport("pull-test", "Pulling from swapctl/llama-server"),
        ),
        (
            {"status": "Pulling fs layer", "progressDetail": {}, "id": "a1"},
            LayerReport("a1", "Pulling fs layer"),
        ),
        (
            {
                "status": "Downloading",
                "progressDetail": {"current": 5, "total": 9},
                "progress": "[=>  ]",
                "id": "a1",
            },
            LayerReport("a1", "Downloading", 5, 9),
        ),
        ({"status": "Digest: sha256:9b9b"}, LayerReport("", "Digest: sha256:9b9b")),
        (
            {"status": "Extracting", "progressDetail": {"current": "x", "total": None}, "id": "a1"},
            LayerReport("a1", "Extracting"),
        ),
        ({}, LayerReport("", "")),
    ],
)
def test_a_line_of_the_stream_is_a_report(line: dict[str, Any], report: LayerReport) -> None:
    assert pull_report(line) == report


def test_the_tally_sums_downloads_over_layers() -> None:
    tally = PullTally("img")
    reports = [
        (LayerReport("", "Pulling from team/img"), (0, 0)),
        (LayerReport("a", "Pulling fs layer"), (0, 0)),
        (LayerReport("b", "Already exists"), (0, 0)),  # on the machine: nothing to download
        (LayerReport("a", "Downloading", 100, 400), (100, 400)),
        (LayerReport("c", "Waiting"), (100, 400)),  # a total is known from its first bytes
        (LayerReport("c", "Downloading", 0, 600), (100, 1000)),
        (LayerReport("a", "Downloading", 500, 400), (400, 1000)),  # never past its total
        (LayerReport("a", "Verifying Checksum"), (400, 1000)),
        (LayerReport("a", "Download complete"), (400, 1000)),
        (LayerReport("a", "Extracting", 200, 400), (400, 1000)),  # unpacking: not a download
        (LayerReport("c", "Pull complete"), (1000, 1000)),  # done, whatever was last reported
    ]
    for report, (done, total) in reports:
        assert tally.add(report) == Pulled("img", done, total)
    assert tally.pulled.sizes == "1.0/1.0 kB"


@pytest.mark.parametrize(
    ("counts", "text"),
    [
        ((0, 0), "0/0 B"),
        ((512,), "512 B"),
        ((1_500, 3_000), "1.5/3.0 kB"),
        ((2_300_000, 4_500_000), "2.3/4.5 MB"),
        ((120_000_000, 450_000_000), "120/450 MB"),
        ((0, 12_000_000), "0.0/12 MB"),
        ((1_200_000_000,), "1.2 GB"),
    ],
)
def test_sizes_are_shown_in_the_unit_of_the_largest(counts: tuple[int, ...], text: str) -> None:
    assert sizes(*counts) == text


def test_a_failure_names_the_image_and_quotes_the_answer() -> None:
    answer = "manifest for 127.0.0.1:5000/x:1 not found: manifest unknown: manifest unknown"
    assert (
        str(pull_failure("127.0.0.1:5000/x:1", answer)) == f"cannot pull image '127.0.0.1:5000/x:1': {answer}"
    )


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        ('Head "http://127.0.0.1:5000/v2/x/manifests/1": no basic auth credentials', True),
        ("unauthorized: authentication required", True),
        ("pull access denied for x, repository does not exist or may require 'docker login'", False),
        ("connection refused", False),
    ],
)
def test_a_refused_login_says_where_credentials_come_from(answer: str, hint: bool) -> None:
    message = str(pull_failure("x:1", answer))
    assert message.startswith(f"cannot pull image 'x:1': {answer}")
    assert ("swapctl pulls with your Docker config's credentials" in message) is hint
