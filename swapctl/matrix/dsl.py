"""Parse the set DSL: `&` (together), `|` (alternatives), `( )`, `+ref`.

`&` binds tighter than `|`, so `a | b & c` is `a | (b & c)`. Whitespace is ignored.
Positions in errors are 1-based character offsets into the expression.

    expr   := term ('|' term)*
    term   := factor ('&' factor)*
    factor := NAME | '+' NAME | '(' expr ')'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


class _Parser:
    def __init__(self, source: str) -> None:
        self.tokens = tokenize(source)
        self.at = 0

    def peek(self) -> Token:
        return self.tokens[self.at]

    def take(self) -> Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def expr(self) -> Expr:
        items = [self.term()]
        while self.peek().kind == "|":
            self.take()
            items.append(self.term())
        return items[0] if len(items) == 1 else Any(tuple(items))

    def term(self) -> Expr:
        items = [self.factor()]
        while self.peek().kind == "&":
            self.take()
            items.append(self.factor())
        return items[0] if len(items) == 1 else All(tuple(items))

    def factor(self) -> Expr:
        token = self.take()
        if token.kind == "name":
            return Name(token.text, token.position)
        if token.kind == "+":
            name = self.take()
            if name.kind != "name":
                raise DslError("'+' must be followed by a set name", token.position)
            return Ref(name.text, token.position)
        if token.kind == "(":
            inner = self.expr()
            close = self.take()
            if close.kind != ")":
                raise DslError("unbalanced parenthesis: '(' is never closed", token.position)
            return inner
        if token.kind == ")":
            raise DslError("unbalanced parenthesis: unexpected ')'", token.position)
        if token.kind == "end":
            raise DslError("expression ends where a name was expected", token.position)
        raise DslError(f"expected a name before {token.text!r}", token.position)


def parse(source: str) -> Expr:
    """Parse one set expression into a tree; raise DslError with a position."""
    if not source.strip():
        raise DslError("empty expression")
    parser = _Parser(source)
    tree = parser.expr()
    rest = parser.peek()
    if rest.kind == ")":
        raise DslError("unbalanced parenthesis: unexpected ')'", rest.position)
    if rest.kind != "end":
        raise DslError(f"expected '&' or '|' before {rest.text!r}", rest.position)
    return tree
