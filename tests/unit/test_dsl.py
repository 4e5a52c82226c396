"""Table tests for the set DSL parser."""

from __future__ import annotations

import pytest

from swapctl.matrix.dsl import All, Any, DslError, Expr, Name, Ref, depth, parse


def shape(expr: Expr) -> object:
    """A compact, position-free view of a tree."""
    if isinstance(expr, Name):
        return expr.text
    if isinstance(expr, Ref):
        return f"+{expr.set_name}"
    op = "&" if isinstance(expr, All) else "|"
    return (op, *[shape(item) for item in expr.items])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("L", "L"),
        ("a & b", ("&", "a", "b")),
        ("a | b", ("|", "a", "b")),
        ("a | b & c", ("|", "a", ("&", "b", "c"))),
        ("a & b | c", ("|", ("&", "a", "b"), "c")),
        ("(a | b) & c", ("&", ("|", "a", "b"), "c")),
        ("(a | b) & (c | d)", ("&", ("|", "a", "b"), ("|", "c", "d"))),
        ("+llms & v", ("&", "+llms", "v")),
        ("  a&b|c  ", ("|", ("&", "a", "b"), "c")),
        ("((a))", "a"),
        ("llama-3.1-8b & qwen2.5:7b", ("&", "llama-3.1-8b", "qwen2.5:7b")),
        ("a & a", ("&", "a", "a")),
    ],
)
def test_parse(source: str, expected: object) -> None:
    assert shape(parse(source)) == expected


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("", "empty expression"),
        ("   ", "empty expression"),
        ("a & (b | c", "unbalanced parenthesis: '(' is never closed at position 5"),
        ("a & b)", "unbalanced parenthesis: unexpected ')' at position 6"),
        ("a $ b", "unexpected character '$' at position 3"),
        ("a & ", "expression ends where a name was expected at position 5"),
        ("a b", "expected '&' or '|' before 'b' at position 3"),
        ("| a", "expected a name before '|' at position 1"),
        ("+ & a", "'+' must be followed by a set name at position 1"),
        ("()", "unbalanced parenthesis: unexpected ')' at position 2"),
    ],
)
def test_parse_errors(source: str, message: str) -> None:
    with pytest.raises(DslError) as caught:
        parse(source)
    assert str(caught.value) == message


def test_positions_point_at_the_token() -> None:
    tree = parse("ab | (cd & +ef)")
    assert isinstance(tree, Any)
    first, second = tree.items
    assert isinstance(first, Name) and first.position == 1
    assert isinstance(second, All)
    assert [getattr(item, "position", None) for item in second.items] == [7, 12]


def test_parentheses_that_add_no_structure_add_no_depth() -> None:
    assert shape(parse("(a & (b & (c)))")) == ("&", "a", "b", "c")
    assert shape(parse("((a | b)) | (c | (d))")) == ("|", "a", "b", "c", "d")
    assert shape(parse("(a & b) | c & (d & e)")) == ("|", ("&", "a", "b"), ("&", "c", "d", "e"))
    assert shape(parse("(" * 5000 + "a" + ")" * 5000)) == "a"


def test_deep_expressions_parse_without_recursion() -> None:
    source = "a"
    for level in range(1000):
        source = f"x{level} {'&|'[level % 2]} ({source})"
    tree = parse(source)
    assert depth(tree) == 1000
    assert depth(parse("a")) == 0 and depth(parse("a & (b | c)")) == 2


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("(" * 600 + "a", "unbalanced parenthesis: '(' is never closed at position 600"),
        ("(" * 600 + "a" + ")" * 601, "unbalanced parenthesis: unexpected ')' at position 1202"),
        ("(" * 600 + ")" * 600, "unbalanced parenthesis: unexpected ')' at position 601"),
        ("((a) b)", "unbalanced parenthesis: '(' is never closed at position 1"),
        ("a | (b & +)", "'+' must be followed by a set name at position 10"),
        ("+", "'+' must be followed by a set name at position 1"),
        ("a & &", "expected a name before '&' at position 5"),
    ],
)
def test_deep_and_odd_errors_keep_their_positions(source: str, message: str) -> None:
    with pytest.raises(DslError) as caught:
        parse(source)
    assert str(caught.value) == message
