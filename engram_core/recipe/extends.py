"""Recipe inheritance: `extends = ["base.toml", ...]`, merged into one self-contained recipe.

A recipe may start with ``extends = ["base.toml"]`` (paths relative to the recipe that
names them; a single string is one base). Bases merge left to right, then the recipe
itself on top:

- tables merge key by key, recursively (``[head]`` with one key changes that key only);
- every other value, lists included, replaces what was inherited, whole;
- a table whose keys are all 0-based indices patches items of an inherited list
  (``[stages.1]`` then ``steps = 500`` changes the second stage's steps only; the same
  dotted paths as command-line overrides); the index one past the end appends an item,
  and ``[stages]`` ``2 = "__delete__"`` drops one (indices count the inherited list);
- ``key = "__delete__"`` removes an inherited key or table; ``memory = "none"`` (as on
  the command line) removes the inherited memory;
- ``__replace__ = true`` inside a table takes that table as written instead of merging it
  (a component of another type, whose base keys would not fit).

`load_tree` returns the merged tables and, for every leaf, the file it came from
(`Origins`), so errors and ``--print-config`` can name where each value was written. The
merged recipe has no ``extends`` left: what the engine writes to ``recipe.toml`` runs again
as it is.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from ..errors import RecipeError, did_you_mean
from .toml import read_toml  # the one TOML reader, with its one-line errors

EXTENDS = "extends"
DELETE = "__delete__"
REPLACE = "__replace__"
NONE_TABLES = ("memory",)  # top-level tables that "none" removes (as `memory=none` does on the command line)

Key = tuple[str, ...]


class Origins:
    """Where each leaf of a merged recipe was written: {key path: label}.

    A leaf is a value that is not a table; the items of a list of tables are followed
    (``stages.1.lr``), other lists are leaves. Labels are file paths, ``override ...``.
    """

    def __init__(self) -> None:
        self.by_key: dict[Key, str] = {}

    def set_tree(self, prefix: Key, value: Any, source: str | Origins) -> None:
        """Record `value`'s leaves under `prefix` as written by `source` (a label, or
        the Origins of the base it was inherited from)."""
        self.drop(prefix)
        for key in _leaves(prefix, value):
            label = source if isinstance(source, str) else source.of(key)
            if label is not None:
                self.by_key[key] = label

    def drop(self, prefix: Key) -> None:
        n = len(prefix)
        for key in [k for k in self.by_key if k[:n] == prefix]:
            del self.by_key[key]

    def remove_item(self, prefix: Key, index: int) -> None:
        """Item `index` of the list at `prefix` was deleted: later items move up by one."""
        n = len(prefix)
        moved = {}
        for key, label in self.by_key.items():
            if key[:n] == prefix and len(key) > n and key[n].isdigit():
                j = int(key[n])
                if j == index:
                    continue
                moved[(*prefix, str(j - 1 if j > index else j), *key[n + 1:])] = label
            else:
                moved[key] = label
        self.by_key = moved

    def of(self, key: Key) -> str | None:
        """The label of a leaf, of the nearest enclosing leaf, or the one label of everything under it."""
        for n in range(len(key), 0, -1):
            if key[:n] in self.by_key:
                return self.by_key[key[:n]]
        under = {v for k, v in self.by_key.items() if k[: len(key)] == key}
        if len(under) == 1:
            return under.pop()
        return "several files" if under else None

    def file_of_path(self, dotted: str) -> str | None:
        return self.of(tuple(p for p in dotted.replace("[", ".").replace("]", "").split(".") if p))


def _leaves(prefix: Key, value: Any):
    if isinstance(value, dict):
        if not value:
            yield prefix
        for k, v in value.items():
            yield from _leaves((*prefix, str(k)), v)
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        for i, v in enumerate(value):
            yield from _leaves((*prefix, str(i)), v)
    else:
        yield prefix


def read_file(path: Path) -> dict:
    return read_toml(path)


def load_tree(path: str | Path, raw: dict | None = None) -> tuple[dict, Origins]:
    """The recipe at `path` with all its bases merged, and where each value came from.

    `raw` stands for the file's contents when given (its `extends` are still relative
    to `path`)."""
    return _load(Path(path), raw, chain=())


def _load(path: Path, raw: dict | None, chain: tuple[Path, ...]) -> tuple[dict, Origins]:
    label = str(path)
    origins = Origins()
    here = path.resolve()
    if here in chain:
        loop = " -> ".join(os.path.relpath(p) for p in (*chain, here))
        raise RecipeError([(EXTENDS, f"inheritance cycle: {loop}")], file=str(chain[-1]) if chain else label)
    data = copy.deepcopy(raw) if raw is not None else read_file(path)
    bases = data.pop(EXTENDS, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError([(EXTENDS, f"expected a list of recipe paths (relative to this file), got {bases!r}")], file=label)
    merged: dict = {}
    for base in bases:
        base_path = Path(os.path.normpath(path.parent / base))
        if not base_path.is_file():
            raise RecipeError([(EXTENDS, f"base recipe not found: {base} (looked for {base_path}; paths are relative to this file)")], file=label)
        inherited, inherited_origins = _load(base_path, None, (*chain, here))
        merge_into(merged, inherited, origins, inherited_origins, prefix=())
    merge_into(merged, data, origins, label, prefix=())
    _strip_markers(merged)
    return merged, origins


def merge_into(target: dict, update: dict, origins: Origins | None, label: str | Origins | None, prefix: Key) -> None:
    """Merge `update` onto `target` in place, by the rules of the module docstring;
    `origins` (when given) follows, each new leaf labelled by `label`."""
    for key, value in update.items():
        path = (*prefix, key)
        old = target.get(key)
        if value == DELETE and key not in target:  # a typo (`hiden`) must not leave `hidden` silently in place
            where = ".".join(path)
            raise RecipeError([(where, f"\"{DELETE}\" removes an inherited key, but no base recipe has '{where}'"
                                       f"{did_you_mean(key, [k for k in target if isinstance(k, str)])}")],
                              file=label if isinstance(label, str) else None)
        if value == DELETE or (prefix == () and key in NONE_TABLES and value == "none"):
            target.pop(key, None)
            if origins is not None:
                origins.drop(path)
            continue
        if isinstance(value, dict) and value.get(REPLACE) is True:
            table = {k: v for k, v in value.items() if k != REPLACE}
            target[key] = copy.deepcopy(table)
            if origins is not None:
                origins.set_tree(path, table, label)
            continue
        if isinstance(value, dict) and isinstance(old, dict):
            merge_into(old, value, origins, label, path)
            continue
        if isinstance(value, dict) and isinstance(old, list) and value and all(_is_index(k) for k in value):
            _patch_list(old, value, origins, label, path)
            continue
        target[key] = copy.deepcopy(value)
        if origins is not None:
            origins.set_tree(path, value, label)


def _patch_list(old: list, patches: dict, origins: Origins | None, label: str | Origins | None, path: Key) -> None:
    """`[stages.1]` tables patch items of an inherited list; `stages.2 = "__delete__"` drops
    one. Indices always count the inherited list (deletions happen last, from the end)."""
    deletions = []
    for idx, item in sorted(patches.items(), key=lambda kv: int(kv[0])):
        i = int(idx)
        if i == len(old) and item != DELETE:  # one past the end: a new item
            old.append(None)
        if i >= len(old):
            where = ".".join((*path, idx))
            raise RecipeError([(where, f"index {i} out of range: the inherited list has {len(old)} items (indices are 0-based; the next index appends)")], file=label if isinstance(label, str) else None)
        if item == DELETE:
            deletions.append(i)
        elif isinstance(item, dict) and isinstance(old[i], dict) and item.get(REPLACE) is not True:
            merge_into(old[i], item, origins, label, (*path, idx))
        else:
            old[i] = copy.deepcopy({k: v for k, v in item.items() if k != REPLACE} if isinstance(item, dict) else item)
            if origins is not None:
                origins.set_tree((*path, idx), old[i], label)
    for i in sorted(deletions, reverse=True):
        del old[i]
        if origins is not None:
            origins.remove_item(path, i)


def _is_index(key: str) -> bool:
    return key.isdecimal() and key.isascii()  # `³`.isdigit() is True, int("³") fails


def _strip_markers(node: Any) -> None:
    """A marker left after merging had nothing to act on (`__replace__` in a base's own
    table is harmless and dropped; `__delete__` of a key no base has is an error in `merge_into`)."""
    if isinstance(node, dict):
        node.pop(REPLACE, None)
        for k in [k for k, v in node.items() if v == DELETE]:
            del node[k]
        for v in node.values():
            _strip_markers(v)
    elif isinstance(node, list):
        for v in node:
            _strip_markers(v)


def attribute(exc: RecipeError, origins: Origins, file: str) -> RecipeError:
    """Each problem named by the file its value came from (a base's key is that base's
    problem; the recipe and overrides keep the recipe's name)."""
    if not any(label not in (file, None) and not label.startswith("override") for label in origins.by_key.values()):
        return exc.with_file(file)
    lines = []
    for path, msg in exc.problems:
        where = origins.file_of_path(path) if path else None
        if where and where != file and not where.startswith("override") and where != "several files":
            lines.append((path, f"{msg} (inherited by {file})", where))
        else:
            lines.append((path, msg, exc.file or file))
    return MultiFileRecipeError(lines)


class MultiFileRecipeError(RecipeError):
    """A RecipeError whose problems lie in several files (a recipe and its bases)."""

    def __init__(self, problems: list[tuple[str, str, str]]):
        self.where = problems
        super().__init__([(p, m) for p, m, _ in problems], file=None)

    def lines(self) -> list[str]:
        return [f"{f}: {p}: {m}" if p else f"{f}: {m}" for p, m, f in getattr(self, "where", [])]

    def with_file(self, file: str) -> RecipeError:
        return self
