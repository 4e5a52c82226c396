"""PURE: the names a model goes by, and the one function that resolves them.

A model is named by its ID (its key under `models:`), by an alias (`aliases:`, the names
clients may send), or by a matrix var (`matrix.vars`, a short name for sets). Each place
that reads a name accepts some of these kinds:

    where the name is written                     accept
    an API request's model, hooks.on_startup      ID | ALIAS | REMOTE
    a command a person types (plan, logs, ...)    VAR | ID | ALIAS | REMOTE
    a matrix set, a matrix.evict_costs key        VAR | ID
    a matrix var's model, a group member          ID

A REMOTE is the ID of a model served elsewhere (`proxy:`): never started, so outside the
matrix. A var wins over a model ID of the same spelling, and a model ID over an alias (the
config refuses an alias that equals a model ID).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Flag, auto

from swapctl.errors import ConfigError


class Kind(Flag):
    """The kinds of name a model goes by."""

    VAR = auto()
    ID = auto()
    ALIAS = auto()
    REMOTE = auto()


@dataclass(frozen=True)
class Names:
    """Every name of every model, built once when the config is parsed."""

    ids: frozenset[str]
    aliases: Mapping[str, str] = field(default_factory=dict)  # alias -> model ID
    vars: Mapping[str, str] = field(default_factory=dict)  # matrix var -> model ID
    remotes: frozenset[str] = frozenset()  # IDs of the models served elsewhere (`proxy:`)
    others: Mapping[str, str] = field(default_factory=dict)  # model ID -> why it is not this host's

    def resolve(
        self, name: object, accept: Kind, *, where: str = "", text: tuple[int, str] | None = None
    ) -> str:
        """The model ID that `name`, read as a name of a kind in `accept`, stands for.

        Otherwise a ConfigError under the key path `where` says what the name is instead;
        `text` is (position, text) of the text it was written in, such as a set, quoted in
        that message only (a set's text may be long, and holds many names). A caller that is
        not reading the config (a request, a command) translates the error.
        """
        if isinstance(name, str):  # the tables first: a Flag test costs more than a lookup
            if name in self.vars and Kind.VAR in accept:
                return self.vars[name]
            if name in self.ids and Kind.ID in accept:
                return name
            if name in self.aliases and Kind.ALIAS in accept:
                return self.aliases[name]
            if name in self.remotes and Kind.REMOTE in accept:
                return name
        at = f" at position {text[0]} in {text[1]!r}" if text else ""
        raise ConfigError(where, self._refusal(name, accept, at))

    def _refusal(self, name: object, accept: Kind, at: str) -> str:
        if isinstance(name, str) and name in self.others:
            return f"'{name}'{at} {self.others[name]}"
        if name in self.remotes:
            return f"'{name}'{at} is a proxy: model, served elsewhere and never started: it stands outside the matrix"
        model = self.aliases.get(name) if isinstance(name, str) else None
        if model is not None:  # aliases are the clients' names; the config names models otherwise
            rule = (
                "sets and evict_costs name vars or model IDs"
                if Kind.VAR in accept
                else "vars and group members name model IDs"
            )
            return f"'{name}'{at} is an alias of model '{model}'; {rule}"
        if Kind.ALIAS in accept:
            return f"unknown model '{name}'{at}"
        if Kind.VAR in accept:
            return f"unknown name '{name}'{at} (not a var nor a model ID)"
        return f"unknown model '{name}'{at} (not in models:)"
