"""Parse the set DSL: `&` (together), `|` (alternatives), `( )`, `+ref`.

`&` binds tighter than `|`, so `a | b & c` is `a | (b & c)`. Whitespace is ignored.
Positions in errors are 1-based character offsets into the expression. Parentheses add
no level where they repeat the operator around them: `(a & (b & c))` is `a & b & c`.

    expr   := term ('|' term)*
    term   := factor ('&' factor)*
    factor := NAME | '+' NAME | '(' expr ')'
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

NAME_CHARS = re.compile(r"[A-Za-z0-9._:/@-]+")
OPERATORS = "&|()+"


class DslError(ValueError):
    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message if position is None else f"{message} at position {position}")
        self.position = position


@dataclass(frozen=True)
class Name:
    text: str
    position: int


@dataclass(frozen=True)
class Ref:
    set_name: str
    position: int


@dataclass(frozen=True)
class All:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Any:
    items: tuple[Expr, ...]


Expr = Name | Ref | All | Any


@dataclass(frozen=True)
class Token:
    kind: str  # one of OPERATORS, "name" or "end"
    text: str
    position: int


def tokenize(source: str) -> list[Token]:
    tokens: list[Token] = []
    i = 0
    while i < len(source):
        char = source[i]
        if char.isspace():
            i += 1
        elif char in OPERATORS:
            tokens.append(Token(char, char, i + 1))
            i += 1
        elif match := NAME_CHARS.match(source, i):
            tokens.append(Token("name", match.group(), i + 1))
            i = match.end()
        else:
            raise DslError(f"unexpected character {char!r}", i + 1)
    tokens.append(Token("end", "", len(source) + 1))
    return tokens


@dataclass
class _Group:
    """An open '(' (or the whole expression, `opened_at` None): its alternatives so far and
    the factors of the term being read. A group inside a term of the same operator adds no
    level: `(a & (b & c))` is one `All` of three, as `_join` flattens compiled trees."""

    opened_at: int | None
    alternatives: list[Expr] = field(default_factory=list)
    factors: list[Expr] = field(default_factory=list)

    def add_factor(self, factor: Expr) -> None:
        self.factors.extend(factor.items if isinstance(factor, All) else (factor,))

    def end_term(self) -> None:
        term = self.factors[0] if len(self.factors) == 1 else All(tuple(self.factors))
        self.factors = []
        self.alternatives.extend(term.items if isinstance(term, Any) else (term,))

    def close(self) -> Expr:
        self.end_term()
        return self.alternatives[0] if len(self.alternatives) == 1 else Any(tuple(self.alternatives))


def _not_a_name(token: Token) -> DslError:
    if token.kind == ")":
        return DslError("unbalanced parenthesis: unexpected ')'", token.position)
    if token.kind == "end":
        return DslError("expression ends where a name was expected", token.position)
    return DslError(f"expected a name before {token.text!r}", token.position)


def parse(source: str) -> Expr:
    """Parse one set expression into a tree; raise DslError with a position.

    The grammar is read with an explicit stack of open parentheses, not by recursion, so
    nesting depth is bounded by memory, not by Python's stack (the compiler bounds depth).
    """
    if not source.strip():
        raise DslError("empty expression")
    tokens = tokenize(source)
    groups = [_Group(None)]
    at = 0
    while True:
        token = tokens[at]  # a factor: NAME, '+' NAME or '('
        at += 1
        if token.kind == "(":
            groups.append(_Group(token.position))
            continue
        if token.kind == "+":
            name = tokens[at]
            at += 1
            if name.kind != "name":
                raise DslError("'+' must be followed by a set name", token.position)
            groups[-1].add_factor(Ref(name.text, token.position))
        elif token.kind == "name":
            groups[-1].add_factor(Name(token.text, token.position))
        else:
            raise _not_a_name(token)
        while True:  # after a factor: '&', '|', or the end of groups
            token = tokens[at]
            if token.kind in ("&", "|"):
                at += 1
                if token.kind == "|":
                    groups[-1].end_term()
                break
            group = groups.pop()
            if group.opened_at is None:
                if token.kind == ")":
                    raise DslError("unbalanced parenthesis: unexpected ')'", token.position)
                if token.kind != "end":
                    raise DslError(f"expected '&' or '|' before {token.text!r}", token.position)
                return group.close()
            if token.kind != ")":
                raise DslError("unbalanced parenthesis: '(' is never closed", group.opened_at)
            at += 1
            groups[-1].add_factor(group.close())


def depth(expr: Expr) -> int:
    """Levels of `&`/`|` above the deepest name (a name alone is 0); without recursion."""
    deepest = 0
    stack: list[tuple[Expr, int]] = [(expr, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (All, Any)):
            stack.extend((item, level + 1) for item in node.items)
        deepest = max(deepest, level)
    return deepest


def leaves(expr: Expr) -> Iterator[Name | Ref]:
    """The names and references of `expr`, left to right; without recursion."""
    stack = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, (All, Any)):
            stack.extend(reversed(node.items))
        else:
            yield node
