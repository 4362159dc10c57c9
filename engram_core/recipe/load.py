"""Loading a recipe: read the file and what it `extends`, apply `key=value` overrides, resolve."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from ..errors import RecipeError, did_you_mean
from ..registry import Registry, load_registry
from .extends import attribute, load_tree
from .resolve import resolve
from .schema import NONE_WORD, OPTIONAL_TABLES, SECTIONS, Recipe

# ---- overrides ------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A TOML value (`1e-3`, `true`, `[1, 2]`, `{ type = "x" }`), else the bare string.

    Raises ValueError for an integer too long for Python to read (over 4300 digits)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise RecipeError([("", f"override {item!r} must look like key.path=value")])
    key, _, value = item.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError([("", f"override {item!r} has an empty key path")])
    try:
        return key, parse_value(value.strip())
    except ValueError:  # tomllib's int() past sys.get_int_max_str_digits
        raise RecipeError([(key, f"override value is a number of {len(value.strip())} characters, too long to read; "
                                 "give a number of ordinary size")]) from None


def split_key(path: str) -> list[str]:
    """Dotted key parts, TOML-style: `sweep."stages.2.steps"` is two parts."""
    try:
        node: Any = tomllib.loads(f"{path} = 0")
    except tomllib.TOMLDecodeError:
        return path.split(".")
    parts = []
    while isinstance(node, dict) and len(node) == 1:
        key = next(iter(node))
        parts.append(key)
        node = node[key]
    return parts


def apply_override(raw: dict, path: str, value: Any, what: str = "override") -> None:
    """Set `path` (dotted, 0-based list indices) in the raw recipe, or raise RecipeError."""
    parts = split_key(path)
    head = parts[0]
    label = f"{what} {path}"
    if head not in SECTIONS:
        raise RecipeError([(path, f"{what}: no such section '{head}'{did_you_mean(head, SECTIONS)}; sections: {', '.join(SECTIONS)}")])
    if len(parts) == 1:
        if value == NONE_WORD:
            if head not in OPTIONAL_TABLES:
                raise RecipeError([(path, f"{what}: only {', '.join(OPTIONAL_TABLES)} can be set to 'none'")])
            raw.pop(head, None)
        else:
            raw[head] = copy.deepcopy(value)
        return
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        node = _step(node, part, where, label, create=False)
    last = parts[-1]
    if isinstance(node, list):
        idx = _index(last, len(node), ".".join(parts), label)
        node[idx] = copy.deepcopy(value)
    elif isinstance(node, dict):
        if value == NONE_WORD and last in node and isinstance(node[last], dict) and ".".join(parts) in OPTIONAL_TABLES:
            node.pop(last)
        else:
            node[last] = copy.deepcopy(value)
    else:
        raise RecipeError([(path, f"{label}: '{'.'.join(parts[:-1])}' is a value, not a table")])


def _step(node: Any, part: str, where: str, label: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(part, len(node), where, label)]
    if isinstance(node, dict):
        if part not in node:
            if where.count(".") == 0 and part in ("run", "sweep"):
                node[part] = {}
                return node[part]
            if where.count(".") > 0:  # a nested config table left to its defaults
                node[part] = {}
                return node[part]
            raise RecipeError([(where, f"{label}: the recipe has no '{where}'{did_you_mean(part, node.keys())}")])
        return node[part]
    raise RecipeError([(where, f"{label}: '{where}' is a value, not a table")])


def _index(part: str, n: int, where: str, label: str) -> int:
    if not (part.lstrip("-").isdecimal() and part.isascii()):  # `³`.isdigit() is True, int("³") fails
        raise RecipeError([(where, f"{label}: '{part}' is not a list index (0-based)")])
    idx = int(part)
    if not 0 <= idx < n:
        raise RecipeError([(where, f"{label}: index {idx} out of range (there are {n}; indices are 0-based)")])
    return idx


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    registry: Registry | None = None,
    raw: dict | None = None,
) -> Recipe:
    """Read, override, validate and resolve a recipe. Raises RecipeError with every problem."""

    file = str(path)
    raw, origins = load_tree(path, raw)  # `extends` merged: one self-contained recipe from here on
    try:
        for item in overrides or []:
            key, value = parse_override(item)
            apply_override(raw, key, value)
            origins.set_tree(tuple(split_key(key)), value, f"override {item}")
    except RecipeError as exc:
        raise exc.with_file(file) from None
    reg = registry or load_registry()
    try:
        recipe = resolve(raw, reg, file)
    except RecipeError as exc:
        raise attribute(exc, origins, file) from None
    recipe.origins = origins
    return recipe
