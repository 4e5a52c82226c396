"""The error tree. Each border translates these once: the CLI into exit codes, the proxy
into OpenAI error JSON.

    SwapctlError
     +-- ConfigError        the configuration is wrong: names the key path
     +-- UnknownModelError  a request or command names no configured model
     +-- BackendError       the container engine failed: names the model when there is one
     |    +-- DaemonUnavailable
     |    +-- ImageMissing
     |    +-- PullFailed    an image could not be pulled: names it and quotes the registry
     |    +-- GpuUnavailable
     |    +-- StopFailed    a container outlived a stop and a kill: it still counts as running
     |    +-- Overdue       a model stuck in a transitional state, ended by the watchdog
     |    +-- UpstreamTimeout  a model's server took longer than its `timeouts`: it stays up
     |    +-- ElsewhereUnavailable  a peer or a `proxy:` model's server did not answer: names it
     +-- Loop               a request came back to a swapctl it had passed through already
     +-- StartError         a model's container did not become ready: names model and cause
     +-- Busy               a model has as many requests as its concurrencyLimit admits
     +-- ShuttingDown       the proxy shut down before a request for a model was answered
     +-- RequestError       an HTTP request is wrong (a bad body, no such route): its status
"""

from __future__ import annotations


class SwapctlError(Exception):
    """Base of every error swapctl reports to a person."""


class ConfigError(SwapctlError):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class UnknownModelError(SwapctlError):
    def __init__(self, name: str, known: tuple[str, ...] = ()) -> None:
        hint = f" (configured: {', '.join(known)})" if known else ""
        super().__init__(f"unknown model '{name}'{hint}")
        self.name = name


class BackendError(SwapctlError):
    def __init__(self, message: str, model: str | None = None) -> None:
        super().__init__(f"model '{model}': {message}" if model else message)
        self.model = model
        self.message = message


class DaemonUnavailable(BackendError):
    pass


class ImageMissing(BackendError):
    pass


class PullFailed(BackendError):
    pass


class GpuUnavailable(BackendError):
    pass


class StopFailed(BackendError):
    pass


class Overdue(BackendError):
    pass


class UpstreamTimeout(BackendError):
    """A model's server took longer than one of its `timeouts`: a slow answer, not a crash."""


class ElsewhereUnavailable(BackendError):
    """A server elsewhere (a peer, a `proxy:` model's) did not answer: `where` names it."""


class Loop(SwapctlError):
    """A request forwarded between peers came back to one it had passed through."""


class StartError(SwapctlError):
    def __init__(self, model: str, cause: str) -> None:
        super().__init__(f"model '{model}' failed to start: {cause}")
        self.model = model
        self.cause = cause


class Busy(SwapctlError):
    def __init__(self, model: str, limit: int) -> None:
        super().__init__(f"model '{model}' is busy: {limit} requests in flight (its concurrencyLimit)")
        self.model = model
        self.limit = limit


class ShuttingDown(SwapctlError):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"the proxy is shutting down: the request for model '{model}' was not answered in time"
        )
        self.model = model


class RequestError(SwapctlError):
    """The client's HTTP request is wrong; answered with `status` and an OpenAI error `code`."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
