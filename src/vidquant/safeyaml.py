"""Bounded, strict YAML loading for files a user (or an attacker) hands vidquant.

PyYAML's SafeLoader runs no code, but it still lets small inputs do large damage: a 1 kB alias bomb
("billion laughs") expands to a structure that hangs whatever walks it, deep nesting overflows the stack
with a RecursionError, and a key given twice silently keeps the last value. Here the text size is checked
before parsing, nesting depth and alias use while the document is composed (before anything recurses or
expands), and every failure is a short ``ValueError`` naming the source and, where known, line and column.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from yaml.events import AliasEvent

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable  # Python >= 3.11; only for the annotations

logger = logging.getLogger(__name__)

_MERGE = "tag:yaml.org,2002:merge"
ECHO_CHARS = 200
MAX_NUMBER_CHARS = 100  # at most this much of anything taken from the input goes into an error message


class _LimitError(yaml.MarkedYAMLError):
    """A bound of `load_yaml` was exceeded (a YAMLError, so it is reported like PyYAML's own)."""


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with duplicate keys refused and nesting depth, aliases and expanded size bounded."""

    def __init__(self, stream: str | bytes, *, max_depth: int, max_aliases: int, max_nodes: int) -> None:
        super().__init__(stream)
        self._max_depth, self._max_aliases, self._max_nodes = max_depth, max_aliases, max_nodes
        self._depth = 0
        self._aliases = 0
        self._nodes = 0  # nodes in the document with every alias expanded: what a consumer walks
        self._sizes: dict[str, int] = {}  # expanded size of each finished anchored node

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Count and bound before composing: an alias adds its anchor's expanded size, a new node adds one."""
        event = self.peek_event()
        if self.check_event(AliasEvent):
            self._aliases += 1
            if self._aliases > self._max_aliases:
                raise _LimitError(None, None, f"more than {self._max_aliases} aliases", event.start_mark)
            if event.anchor in self.anchors and event.anchor not in self._sizes:
                raise _LimitError(None, None, f"alias {_cut(event.anchor)} refers to a node that contains it "
                                  "(a recursive structure)", event.start_mark)
            self._grow(self._sizes.get(event.anchor, 0), event.start_mark)  # undefined: PyYAML's own error
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > self._max_depth:
            raise _LimitError(None, None, f"nesting deeper than {self._max_depth} levels", event.start_mark)
        before = self._nodes
        self._grow(1, event.start_mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._sizes[event.anchor] = self._nodes - before
        return node

    def _grow(self, count: int, mark: yaml.Mark) -> None:
        self._nodes += count
        if self._nodes > self._max_nodes:
            raise _LimitError(None, None, f"more than {self._max_nodes} nodes once aliases are expanded", mark)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's constructors let Python's own errors out (a bad date, a float too big): report them as YAML's."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError, TypeError) as err:
            raise yaml.constructor.ConstructorError(
                None, None, f"invalid {node.tag.rsplit(':', 1)[-1]}: {_cut(str(err))}", node.start_mark
            ) from None

    def construct_number(self, node: yaml.ScalarNode) -> int | float:
        """A number is refused beyond `MAX_NUMBER_CHARS`: a long sexagesimal one costs time quadratic in length."""
        if len(node.value) > MAX_NUMBER_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(node.value)} characters (at most {MAX_NUMBER_CHARS})", node.start_mark
            )
        if node.tag == "tag:yaml.org,2002:int":
            return self.construct_yaml_int(node)
        return self.construct_yaml_float(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A key given twice is an error, not silently the last value."""
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:  # "<<: *base" merges a mapping in; SafeConstructor expands it below
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # a list or mapping as a key: PyYAML's message, not a TypeError
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, "found unhashable key", key_node.start_mark
                ) from None
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{_cut(str(key))}'",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_number)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_number)


def load_yaml(
    text_or_path: str | bytes | os.PathLike[str],
    *,
    source: str,
    max_bytes: int = 1_000_000,
    max_depth: int = 64,
    max_aliases: int = 100,
    max_nodes: int = 100_000,
) -> Any:
    """One YAML document (SafeLoader: no python tags), strictly and boundedly parsed.

    ``text_or_path``: YAML text (``str`` or ``bytes``; a ``str`` is never taken for a file name) or a path
    (``pathlib.Path`` or another ``os.PathLike``). ``source`` names the input in error messages.
    Raises ValueError on a size, depth, alias or node-count limit, a duplicate key, an unknown tag, or any
    YAML error, with the line and column where PyYAML reports one.
    """
    text = _read(text_or_path, source, max_bytes) if isinstance(text_or_path, os.PathLike) else text_or_path
    if not isinstance(text, (str, bytes)):
        raise ValueError(f"{source}: expected YAML text or a path, got {type(text).__name__}")
    size = len(text.encode("utf-8", "surrogatepass")) if isinstance(text, str) and len(text) <= max_bytes else len(text)
    if size > max_bytes:
        raise ValueError(f"{source}: {size} bytes of YAML, more than the {max_bytes}-byte limit")
    loader = None
    try:
        loader = _BoundedLoader(text, max_depth=max_depth, max_aliases=max_aliases, max_nodes=max_nodes)
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ValueError(f"{source}: invalid YAML{_problem(err)}") from None
    except RecursionError:  # the depth bound should make this unreachable; never let it escape regardless
        raise ValueError(f"{source}: invalid YAML: nested too deeply") from None
    except (ValueError, OverflowError, TypeError) as err:  # from PyYAML outside construction; should not happen
        raise ValueError(f"{source}: invalid YAML: {_cut(str(err))}") from None
    finally:
        if loader is not None:
            loader.dispose()


def bundled_names(folder: Traversable) -> list[str]:
    """The names of the ``*.yaml`` files shipped in a package folder (recipes, grids, policies), sorted."""
    return sorted(e.name.removesuffix(".yaml") for e in folder.iterdir() if e.name.endswith(".yaml"))


def load_named_mapping(name_or_path: str | Path, folder: Traversable, what: str
                       ) -> tuple[dict[str, Any], Traversable | Path, bool]:
    """A bundled YAML mapping by name (``folder/<name>.yaml``) or a user's file: ``(data, source, bundled)``.

    The one rule behind `load_recipe`, `load_grid` and `load_policy`: a name of a bundled file wins, anything else
    must be a file; ``data`` gets the file's stem as its ``name`` unless it has one. Errors name the file.
    """
    names = bundled_names(folder)
    bundled = isinstance(name_or_path, str) and name_or_path in names
    if bundled:
        source: Traversable | Path = folder / f"{name_or_path}.yaml"
    else:
        source = Path(name_or_path).expanduser()
        if not source.is_file():
            raise ValueError(f"{name_or_path}: neither a bundled {what} ({', '.join(names)}) nor a file")
    try:
        text = source.read_bytes()
    except OSError as err:
        raise ValueError(f"{source}: unreadable ({err.strerror or err})") from None
    data = load_yaml(text, source=str(source))
    if not isinstance(data, dict):
        raise ValueError(f"{source}: a {what} must be a YAML mapping of keys to values, got {type(data).__name__}")
    data.setdefault("name", source.name.removesuffix(".yaml").removesuffix(".yml"))
    return data, source, bundled


def _read(path: os.PathLike[str], source: str, max_bytes: int) -> bytes:
    """The file's bytes, its size checked before reading (and a FIFO or device refused, not waited on)."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{source}: not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"{source}: {info.st_size} bytes of YAML, more than the {max_bytes}-byte limit")
        with open(Path(path), "rb") as f:
            return f.read(max_bytes + 1)  # if it grew since stat, the caller's size check still fires
    except OSError as err:
        raise ValueError(f"{source}: unreadable ({err.strerror or err})") from None


def _problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one short line, with the position: ' at line L, column C: context: problem'."""
    if not isinstance(err, yaml.MarkedYAMLError):  # a ReaderError: bad encoding or a control character
        return f": {_cut(' '.join(str(err).split()), 2 * ECHO_CHARS)}"
    context = f"{err.context}: " if err.context else ""
    problem = _cut(f"{context}{err.problem or ''}".replace("\n", " "), 2 * ECHO_CHARS)  # parts may be cut already
    mark = err.problem_mark or err.context_mark
    if mark is None:
        return f": {problem}"
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _cut(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters: anything echoed from the input may be huge."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"
