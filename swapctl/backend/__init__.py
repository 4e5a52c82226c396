"""The seam to the container engine. `docker.py` is the only module that imports the SDK;
`aio.py` holds its awaitable face (asyncio with it), imported by those who await: a command
that reads the engine once loads none of it."""

from swapctl.backend.base import Backend, Container, LogFollow
from swapctl.backend.progress import LayerReport, Pulled, PullListener, PullTally

__all__ = [
    "Backend",
    "Container",
    "LayerReport",
    "LogFollow",
    "PullListener",
    "PullTally",
    "Pulled",
]
