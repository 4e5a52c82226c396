"""The seam to the container engine. `docker.py` is the only module that imports the SDK."""

from swapctl.backend.aio import AsyncBackend, AsyncLogFollow
from swapctl.backend.base import Backend, Container, LogFollow
from swapctl.backend.progress import LayerReport, Pulled, PullListener, PullTally

__all__ = [
    "AsyncBackend",
    "AsyncLogFollow",
    "Backend",
    "Container",
    "LayerReport",
    "LogFollow",
    "PullListener",
    "PullTally",
    "Pulled",
]
