"""Why an engine did not answer, in a person's words: each failure the SDK can raise on the way
(wrapped as requests wraps them) is named for what it means to someone running swapctl."""

from __future__ import annotations

import pytest
import requests

from swapctl.backend.docker import _unreachable
from swapctl.config.hosts import Engine

ENGINE = Engine(name="gpu2", docker="tcp://10.0.0.2:2376", timeout=3)


def _wrapped(cause: BaseException) -> requests.exceptions.ConnectionError:
    try:
        try:
            raise cause
        except BaseException as inner:
            raise requests.exceptions.ConnectionError("('Connection aborted.', ...)") from inner
    except requests.exceptions.ConnectionError as outer:
        return outer


@pytest.mark.parametrize(
    ("cause", "said"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connection refused: is dockerd running"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection reset: the engine dropped it"),
        (TimeoutError("timed out"), "no answer within 3s"),
        (EOFError("Timeout opening channel."), "no answer within 3s"),  # paramiko's, for an ssh session
        (OSError(113, "No route to host"), "no answer ("),
    ],
)
def test_each_failure_is_named_with_the_engine_and_its_cause(cause: BaseException, said: str) -> None:
    message = str(_unreachable(_wrapped(cause), ENGINE, "qwen"))
    assert message.startswith(
        "model 'qwen': cannot reach the Docker engine of host 'gpu2' (tcp://10.0.0.2:2376): "
    )
    assert said in message
    assert str(cause) in message  # the SDK's own words follow
