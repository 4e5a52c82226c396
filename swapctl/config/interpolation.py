"""PURE: Compose's variable interpolation, applied to every string value of the configuration.

The rules are Compose's (https://docs.docker.com/reference/compose-file/interpolation/, as
compose-go implements them in
https://github.com/compose-spec/compose-go/blob/main/template/template.go):

    $$                  a literal $
    $NAME  ${NAME}      the variable's value; unset: an empty string, and a warning
    ${NAME:-default}    default when NAME is unset or empty;  ${NAME-default}: only when unset
    ${NAME:?message}    an error when NAME is unset or empty; ${NAME?message}: only when unset
    ${NAME:+other}      other when NAME is set and not empty; ${NAME+other}: when set

NAME is letters, digits and '_', not starting with a digit. A default, a message or an
`other` may hold interpolations itself (`${A:-${B}}`). Any other `$` is an error: write `$$`
for a literal one. Errors give the position, never the text (an API key may be in it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")  # two-character ones first: they share a prefix


class InterpolationError(ValueError):
    """A `$` that Compose would refuse, or a required variable without a value."""


@dataclass
class Substitution:
    """One string's interpolation: the text, and what a caller may warn about or refuse."""

    text: str = ""
    substituted: bool = False  # a variable was read (not only `$$`): the value is text from outside
    unset: list[str] = field(default_factory=list)  # $NAME / ${NAME} whose NAME is not set
    empty: list[str] = field(default_factory=list)  # $NAME / ${NAME} whose NAME is set but empty


def substitute(text: str, environ: Mapping[str, str]) -> Substitution:
    """`text` with every interpolation replaced by its value from `environ`."""
    found = Substitution()
    found.text = _Scanner(environ, found).scan(text, 0, len(text))
    return found


@dataclass
class _Scanner:
    environ: Mapping[str, str]
    found: Substitution

    def scan(self, text: str, start: int, stop: int) -> str:
        parts: list[str] = []
        at = start
        while (dollar := text.find("$", at, stop)) >= 0:
            parts.append(text[at:dollar])
            value, at = self._dollar(text, dollar, stop)
            parts.append(value)
        parts.append(text[at:stop])
        return "".join(parts)

    def _dollar(self, text: str, at: int, stop: int) -> tuple[str, int]:
        """The value of the interpolation that starts at `at`, and where the text goes on."""
        following = text[at + 1] if at + 1 < stop else ""
        if following == "$":
            return "$", at + 2
        if following == "{":
            return self._braced(text, at, stop)
        name = _NAME.match(text, at + 1, stop)
        if name is None:
            raise InterpolationError(
                f"'$' at position {at + 1} starts no variable: write '$$' for a literal '$', "
                "'${NAME}' for a variable"
            )
        return self._plain(name[0]), name.end()

    def _plain(self, name: str) -> str:
        self.found.substituted = True
        value = self.environ.get(name)
        if value is None:
            self.found.unset.append(name)
        elif not value:
            self.found.empty.append(name)
        return value or ""

    def _braced(self, text: str, at: int, stop: int) -> tuple[str, int]:
        close = _closing_brace(text, at, stop)
        name = _NAME.match(text, at + 2, close)
        operator = next((op for op in _OPERATORS if name and text.startswith(op, name.end(), close)), "")
        if name is None or (name.end() != close and not operator):
            raise InterpolationError(
                f"'${{' at position {at + 1} is not ${{NAME}}, ${{NAME:-default}}, ${{NAME-default}}, "
                "${NAME:?message}, ${NAME?message}, ${NAME:+value} or ${NAME+value}; "
                "write '$$' for a literal '$'"
            )
        if not operator:
            return self._plain(name[0]), close + 1
        self.found.substituted = True
        value = self.environ.get(name[0])
        argument = (text, name.end() + len(operator), close)
        return self._apply(operator, name[0], value, argument), close + 1

    def _apply(self, operator: str, name: str, value: str | None, argument: tuple[str, int, int]) -> str:
        """`${NAME<operator>argument}`; the argument is interpolated only when it is used."""
        present = value is not None and (value != "" or not operator.startswith(":"))
        if operator.endswith("-"):
            return value if present and value is not None else self.scan(*argument)
        if operator.endswith("+"):
            return self.scan(*argument) if present else ""
        if not present or value is None:  # ":?" and "?"
            message = self.scan(*argument)
            raise InterpolationError(
                f"required variable {name} is missing a value" + (f": {message}" if message else "")
            )
        return value


def _closing_brace(text: str, at: int, stop: int) -> int:
    """Where the `${` at `at` closes, nested `${...}` counted (as compose-go counts them)."""
    depth, index = 0, at
    while index < stop:
        if text.startswith("${", index):
            depth, index = depth + 1, index + 2
            continue
        if text[index] == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    raise InterpolationError(f"'${{' at position {at + 1} is never closed by '}}'")
