"""The seam to the container engine. `docker.py` is the only module that imports the SDK."""

from swapctl.backend.aio import AsyncBackend
from swapctl.backend.base import Backend, Container

__all__ = ["AsyncBackend", "Backend", "Container"]
