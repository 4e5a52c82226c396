"""The lifecycle seen from outside `swapctl up`, for the commands that ask what runs
(`status`, `plan`): each model's `ModelStatus` read from the container engine when no proxy
answers, and the models a decision counts as running in such a picture (or the proxy's).

Read from the engine, a status says only what the engine knows. A model without a container
is `stopped`; one whose container runs while its server sleeps (vLLM's sleep mode, asked at
GET /is_sleeping) is `sleeping`; any other container shows the engine's own word (`running`,
`exited`, ...): nobody asked its health, so it is not called `ready`. Nobody counts its
requests in flight or measured its GPU memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from swapctl.backend import Container
from swapctl.config import Config
from swapctl.lifecycle.slot import ModelStatus, State

# what `plan` counts as not running: no container, none yet (its image being pulled), one on
# its way out, or one asleep
NOT_RUNNING = frozenset(
    state.value for state in (State.STOPPED, State.PULLING, State.STOPPING, State.LEAVING, State.SLEEPING)
)


def read_statuses(
    config: Config, containers: Iterable[Container], asleep: Callable[[Container], bool], now: float
) -> list[ModelStatus]:
    """Every configured model's status from its container, in the config's order; `asleep`
    is asked only of a running container whose model has `sleep`."""
    found = {container.model: container for container in containers}
    statuses = []
    for model, settings in config.models.items():
        container = found.get(model)
        if container is None:
            statuses.append(ModelStatus(model, State.STOPPED.value, None, None, 0, None, None))
            continue
        sleeping = settings.sleep is not None and container.running and asleep(container)
        statuses.append(_status(container, sleeping, now))
    return statuses


def _status(container: Container, sleeping: bool, now: float) -> ModelStatus:
    return ModelStatus(
        model=container.model,
        state=State.SLEEPING.value if sleeping else container.state,
        container=container.name,
        host_port=container.host_port,
        in_flight=0,  # not counted: shown as unknown (`to_json`)
        ready_seconds=now - container.started_at if container.started_at else None,
        idle_seconds=None,
        gpus=tuple(int(i) for i in container.placed if i.isdigit()) or None,
    )


def to_json(status: ModelStatus) -> dict[str, object]:
    """A status read from the engine as `status --json` shows it: requests in flight null
    (nobody counts them), and no `gpu_memory` (nobody measured it)."""
    row = status.to_json()
    del row["gpu_memory"]
    row["in_flight"] = None
    return row


def asleep(container: Container) -> bool:
    """Whether the container's server says it sleeps (vLLM's GET /is_sleeping); asked
    briefly: a server that does not answer is taken as awake."""
    import httpx  # here: `status` with nothing running does not load it

    try:
        answer = httpx.get(container.url + "/is_sleeping", timeout=1.0).json()
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(answer, dict) and answer.get("is_sleeping") is True


def counted_running(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The models a decision counts as running, sorted, from status rows (the proxy's
    /running, or `to_json`'s)."""
    return sorted(row["model"] for row in rows if row["state"] not in NOT_RUNNING)
