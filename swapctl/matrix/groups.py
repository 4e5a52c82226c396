"""The legacy `groups:` engine, llama-swap's alternative to the matrix.

swap: members run one at a time. exclusive: loading a member stops other groups' models
unless their group is persistent. Models in no group form an implicit group with swap and
exclusive set: one model at a time, the classic behaviour.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from swapctl.matrix.decision import Candidate, Decision

DEFAULT_GROUP = "(default)"


@dataclass(frozen=True)
class Group:
    name: str
    members: tuple[str, ...]
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False


@dataclass(frozen=True)
class GroupPolicy:
    groups: tuple[Group, ...]
    models: tuple[str, ...]

    def group_of(self, model: str) -> Group:
        for group in self.groups:
            if model in group.members:
                return group
        grouped = {m for g in self.groups for m in g.members}
        return Group(DEFAULT_GROUP, tuple(m for m in self.models if m not in grouped))

    def summary(self) -> str:
        if not self.groups:
            return "no matrix nor groups: one model at a time"
        return f"{len(self.groups)} groups"

    def cost(self, model: str) -> int:
        return 1

    def with_costs(self, costs: Mapping[str, int]) -> GroupPolicy:
        """Groups weigh no costs: a request stops what its group says, whatever it costs."""
        return self

    def with_placement(self, placed: Mapping[str, tuple[int, ...]]) -> GroupPolicy:
        return self

    def decide(self, model: str, running: Collection[str], explain: bool = False) -> Decision:
        if model in running:
            return Decision(model, True, None, tuple(sorted(running)), (), 0)
        group = self.group_of(model)

        def must_stop(other: str) -> bool:
            if other in group.members:
                return group.swap
            return group.exclusive and not self.group_of(other).persistent

        evict = tuple(sorted(r for r in running if must_stop(r)))
        after = tuple(sorted({model, *running} - set(evict)))
        candidates = (Candidate(group.name, after, evict, len(evict)),) if explain else ()
        return Decision(model, False, group.name, after, evict, len(evict), candidates)
