"""What a solver answers: the decision for one request, as a value."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    """One set (or group) that can hold the requested model, and what choosing it costs."""

    set: str
    combination: tuple[str, ...]
    evict: tuple[str, ...]
    cost: int


@dataclass(frozen=True)
class Decision:
    model: str
    already_running: bool
    set: str | None
    target_set: tuple[str, ...]
    evict: tuple[str, ...]
    cost: int
    candidates: tuple[Candidate, ...] = ()
    devices: tuple[int, ...] | None = None  # where a policy that places models puts this one

    def to_json(self) -> dict[str, object]:
        """The decision as JSON; `devices` only where the policy placed the model."""
        placed = {} if self.devices is None else {"devices": list(self.devices)}
        return {
            "model": self.model,
            "already_running": self.already_running,
            "set": self.set,
            "target_set": list(self.target_set),
            "evict": list(self.evict),
            "cost": self.cost,
            "candidates": [
                {"set": c.set, "combination": list(c.combination), "evict": list(c.evict), "cost": c.cost}
                for c in self.candidates
            ],
            **placed,
        }


class Policy(Protocol):
    """Decides which running models must stop so that `model` may start."""

    def decide(self, model: str, running: Collection[str], explain: bool = False) -> Decision:
        """`model` is a model ID; `explain` asks for every candidate, not only the winner."""
        ...

    def summary(self) -> str:
        """One line describing the policy, for `swapctl validate`."""
        ...

    def cost(self, model: str) -> int:
        """What losing `model` costs when it runs."""
        ...

    def with_costs(self, costs: Mapping[str, int]) -> Policy:
        """The same policy, deciding with `costs` for the models they name (each at least 1;
        a name it does not know is ignored) and its own costs for the rest."""
        ...

    def with_placement(self, placed: Mapping[str, tuple[int, ...]]) -> Policy:
        """The same policy, knowing the GPUs each model's container was given (model ->
        device indexes): a policy that places models on GPUs keeps those where they are."""
        ...


def allowed_part(policy: Policy, running: Iterable[str]) -> tuple[str, ...]:
    """The models of `running` that may go on running together: the costliest to lose are
    kept first, and a model joins only if a request for it would stop none of those kept.
    `running` itself when the policy allows all of it."""
    kept: list[str] = []
    for model in sorted(set(running), key=lambda m: (-policy.cost(m), m)):
        if not policy.decide(model, kept).evict:
            kept.append(model)
    return tuple(sorted(kept))
