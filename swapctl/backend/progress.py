"""A pull's progress: each report as the engine sends it (one layer's status, and its bytes
where it counts them), and the tally of downloaded bytes over all layers.

An engine reports a layer as `Pulling fs layer`, `Waiting`, `Downloading` (bytes done and
total), `Verifying Checksum`, `Download complete`, `Extracting` (bytes again, of the
unpacking), `Pull complete`; one already on the machine as `Already exists`. The tally counts
downloads only: a layer's total is known from its first `Downloading` report, so the total
grows as layers begin, as `docker pull` shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

DONE = ("Download complete", "Pull complete")
UNITS = ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


@dataclass(frozen=True)
class LayerReport:
    """One report of a pull: a layer's status (the layer "" for the image as a whole)."""

    layer: str
    status: str
    current: int | None = None  # bytes, while downloading or extracting
    total: int | None = None


PullListener = Callable[[LayerReport], None]


@dataclass(frozen=True)
class Pulled:
    """How far an image's pull has come: bytes downloaded, of those known so far."""

    image: str
    done: int = 0
    total: int = 0

    @property
    def sizes(self) -> str:
        """`120/450 MB`."""
        return sizes(self.done, self.total)


def sizes(*counts: int) -> str:
    """Byte counts in the unit of the largest, as `docker pull` shows them: `120/450 MB`."""
    scale, unit = next(((s, u) for s, u in UNITS if max(counts) >= s), (1.0, "B"))
    figures = [count / scale for count in counts]
    return "/".join(f"{f:.1f}" if f < 10 and scale > 1 else f"{f:.0f}" for f in figures) + f" {unit}"


class PullTally:
    """Per-layer download bytes, summed over the image's layers."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.layers: dict[str, tuple[int, int]] = {}  # layer -> (done, total)

    def add(self, report: LayerReport) -> Pulled:
        """Count `report`; how far the pull has come since."""
        if report.status == "Downloading" and report.layer and report.total:
            self.layers[report.layer] = (min(report.current or 0, report.total), report.total)
        elif report.status in DONE and report.layer in self.layers:
            total = self.layers[report.layer][1]
            self.layers[report.layer] = (total, total)
        return self.pulled

    @property
    def pulled(self) -> Pulled:
        return Pulled(
            self.image,
            sum(done for done, _ in self.layers.values()),
            sum(total for _, total in self.layers.values()),
        )
