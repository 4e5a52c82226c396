"""`swapctl pull`: the images of some models pulled ahead of time, one image after another,
each with a rich progress bar per layer (bytes downloaded, then the layer's last status).

`Bars` turns the engine's reports into the display and is fed by hand in tests; `pull_images`
runs the pulls through the backend and collects the failures, so that one image that cannot
be pulled does not stop the others.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn

from swapctl.backend import Backend, LayerReport, PullTally
from swapctl.backend.progress import DONE, sizes
from swapctl.errors import PullFailed

FINISHED = (*DONE, "Already exists")


class Bars:
    """One bar per layer, made when the layer is first reported; reports of the image as a
    whole are lines: "Pulling from" at once, the closing "Digest" and "Status" under the bars.
    The tally sums the bytes downloaded. The display starts with the first layer: a pull that
    reports none (the image is up to date) leaves only its lines."""

    def __init__(self, console: Console, image: str) -> None:
        self.console = console
        self.tally = PullTally(image)
        self.layers: dict[str, TaskID] = {}
        self.progress: Progress | None = None
        self.closing: list[str] = []  # the lines that follow the bars

    def add(self, report: LayerReport) -> None:
        self.tally.add(report)
        if report.status.startswith(("Digest:", "Status:")):
            self.closing.append(report.status)
            return
        if not report.layer or report.status.startswith("Pulling from"):
            self.console.print(report.status)
            return
        progress = self.progress or self._start()
        task = self.layers.get(report.layer)
        if task is None:
            task = self.layers[report.layer] = progress.add_task(report.layer, total=None, status="")
        if report.status == "Downloading" and report.total:
            progress.update(task, completed=report.current or 0, total=report.total)
        elif report.status in FINISHED:  # full, whatever it had (nothing: an empty bar, full)
            total = self.tally.layers.get(report.layer, (0, 0))[1]
            progress.update(task, completed=total, total=total)
        progress.update(task, status=report.status)

    def _start(self) -> Progress:
        self.progress = Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        self.progress.start()
        return self.progress

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        for line in self.closing:
            self.console.print(line)


def pull_images(
    backend: Backend, images: Mapping[str, Sequence[str]], console: Console
) -> list[tuple[str, PullFailed]]:
    """Pull each image (the models that use it are named with it); the (model, error) of
    every model whose image could not be pulled."""
    failed: list[tuple[str, PullFailed]] = []
    for image, models in images.items():
        console.print(f"pulling image [bold]{image}[/] ({', '.join(models)})")
        began = time.monotonic()
        try:
            bars = Bars(console, image)
            try:
                backend.pull(image, bars.add)
            finally:
                bars.close()
        except PullFailed as error:
            failed.extend((model, error) for model in models)
            continue
        took, downloaded = time.monotonic() - began, sizes(bars.tally.pulled.done)
        console.print(f"pulled image [bold]{image}[/] in {took:.1f}s ({downloaded} downloaded)")
    return failed
