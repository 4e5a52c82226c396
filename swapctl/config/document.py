"""Reading a YAML file safely: one document, distinct keys, bounded depth and aliases.

`read_yaml` is the configuration's only reader of files (templates and the config alike);
every error names the file, and the line where YAML can tell it. A value that cannot be
built (`!!int x`, `!!bool maybe`) is an error at its key path that never shows the value:
it may be a secret (an `apiKeys` entry).
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from swapctl.errors import ConfigError

# A config is a few levels deep; PyYAML's composer recurses once a level, and what reads
# the values (validation, repr) recurses too, so a deeper document is refused, not crashed on.
MAX_YAML_DEPTH = 100
# Aliases share one node however often they are used, but what is built from them is a tree:
# ten aliases of ten aliases... ("billion laughs") would build 10^9 values. This bounds the
# nodes that aliases add to what is written.
MAX_ALIAS_EXPANSION = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TAG_PREFIX = "tag:yaml.org,2002:"
# what a scalar of each standard tag may be, for the error when it is something else
_TAG_FORMS = {
    "bool": "true or false (yes/no, on/off)",
    "int": "decimal, 0x hex, 0o octal or 0b binary digits, at most 4300",
    "float": "a number such as 1.5, 1e3, .inf or .nan",
    "timestamp": "a date such as 2001-12-14, or a time such as 2001-12-14 21:59:43.10 -5",
    "binary": "base64 data",
    "null": "null or ~",
}


class _Unbuildable(Exception):
    """A node whose value could not be built: the node, where and why (never the value)."""

    def __init__(self, node: yaml.Node, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.node, self.problem, self.mark = node, problem, mark


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping (YAML keeps the last), and
    nesting past MAX_YAML_DEPTH while it composes (before the composer's recursion would)."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.depth >= MAX_YAML_DEPTH:
            self.check_event()  # the node's first event becomes current_event
            mark = self.current_event.start_mark
            raise yaml.composer.ComposerError(
                None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", mark
            )
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """The node's value; the innermost node that fails names the error (see `_problem`)."""
        try:
            return super().construct_object(node, deep)
        except _Unbuildable:
            raise
        except Exception as error:
            mark = getattr(error, "problem_mark", None) or node.start_mark
            raise _Unbuildable(node, _problem(node, error), mark) from None


def _problem(node: yaml.Node, error: Exception) -> str:
    """Why a node could not be built. A scalar of a standard tag gets the tag's forms rather
    than PyYAML's message, which may quote the value (`invalid literal for int(): 'sk-…'`)."""
    tag = node.tag.removeprefix(_TAG_PREFIX)
    if isinstance(node, yaml.ScalarNode) and tag in _TAG_FORMS:
        return f"not a valid !!{tag} value: {_TAG_FORMS[tag]}"
    if isinstance(error, yaml.constructor.ConstructorError) and error.problem:
        return error.problem
    shown = f"!!{tag}" if node.tag.startswith(_TAG_PREFIX) else node.tag
    return f"not a valid {shown} value"


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    """A mapping whose own keys are distinct; keys a merge (`<<: *base`) brings may be overridden."""
    seen: set[object] = set()
    for key_node, _ in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = loader.construct_object(key_node)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(None, None, "found unhashable key", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _key_path(root: yaml.Node, target: yaml.Node) -> str:
    """The dotted key path of `target` in the document, the first in document order ('' for
    the root or a mapping's key: then the mapping's path)."""
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        if node is target:
            return ".".join(path)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in reversed(node.value):
                name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
                stack += [(value, (*path, name)), (key, path)]
        elif isinstance(node, yaml.SequenceNode):
            stack += [(item, (*path, str(i))) for i, item in reversed(list(enumerate(node.value)))]
    return ""


def _alias_problem(root: yaml.Node) -> str | None:
    """Why the composed document must not be built, or None: an alias inside what it names
    (an endless value), or aliases expanding it past MAX_ALIAS_EXPANSION nodes or
    MAX_YAML_DEPTH levels. One pass over the distinct nodes, memoised by identity."""
    size: dict[int, int] = {}  # id(node) -> nodes in its expansion
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # entered, children not finished: their ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            children = _children(node)
            size[key] = 1 + sum(size[id(child)] for child in children)
            depth[key] = 1 + max((depth[id(child)] for child in children), default=0)
            open_nodes.discard(key)
        elif key in open_nodes:
            return "an alias refers to itself or to a node that contains it (an endless value)"
        elif key not in size:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
    if size[id(root)] - len(size) > MAX_ALIAS_EXPANSION:
        return f"refused: its aliases would expand it by more than {MAX_ALIAS_EXPANSION} nodes"
    if depth[id(root)] > MAX_YAML_DEPTH:
        return f"nested more than {MAX_YAML_DEPTH} levels deep once its aliases are expanded"
    return None


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _build(text: str, path: Path) -> Any:
    """Compose the node graph, measure it, and only then build the values."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if problem := _alias_problem(node):
            raise ConfigError(str(path), problem)
        # built depth first, so a value's errors surface inside its own node (no alias refers
        # to itself: `_alias_problem` refused those)
        loader.deep_construct = True
        try:
            return loader.construct_document(node)
        except _Unbuildable as error:
            where = f"invalid YAML in {path}, line {error.mark.line + 1}, column {error.mark.column + 1}"
            raise ConfigError(_key_path(node, error.node) or str(path), f"{where}: {error.problem}") from None
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Any:
    """The YAML document at `path`; errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(str(path), f"cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(
            str(path), f"not UTF-8 text: byte {error.start + 1} is {error.object[error.start]:#x}"
        ) from None
    try:
        return _build(text, path)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(str(path), f"invalid YAML: {where}{problem}") from None
