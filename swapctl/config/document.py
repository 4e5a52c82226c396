"""Reading a YAML file safely: one document, distinct keys, bounded depth and aliases.

`read_yaml` is the configuration's only reader of files (templates and the config alike);
every error names the file, and the line where YAML can tell it.
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
        return loader.construct_document(node)
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
    except ValueError as error:  # a scalar its tag cannot hold: `!!int x`, an int of 5000 digits
        raise ConfigError(str(path), f"invalid YAML: {error}") from None
