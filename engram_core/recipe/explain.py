"""`--print-config`: the resolved recipe, each value followed by where it came from.

The output is the recipe the run will use, as TOML (it loads and runs as it is), with a
comment on every line: ``# recipe`` (the file given), ``# base recipes/bases/x.toml`` (an
inherited file), ``# override key=value`` (the command line), or ``# default`` (the
component's or stage's default, not written anywhere).
"""

from __future__ import annotations

from typing import Any

from .schema import Recipe
from .toml import toml_key, toml_value

MAX_PAD = 56


def origin_label(recipe: Recipe, key: tuple[str, ...]) -> str:
    label = recipe.origins.of(key) if recipe.origins is not None else None
    if label is None:
        return "default"
    if label == recipe.file:
        return "recipe"
    if label.startswith("override ") or label == "several files":
        return label
    return f"base {label}"


def print_config(recipe: Recipe) -> str:
    """The resolved recipe (sweep included) as commented TOML."""
    out: list[str] = [f"# {recipe.file}, resolved; each value's origin after '#'"]
    for section, value in recipe.to_dict(include_sweep=True).items():
        if isinstance(value, list):
            for i, item in enumerate(value):
                _table(out, f"[[{section}]]", section, item, (section, str(i)), recipe)
        else:
            _table(out, f"[{section}]", section, value, (section,), recipe)
    return "\n".join(out) + "\n"


def _table(out: list[str], header: str, dotted: str, table: dict, key: tuple[str, ...], recipe: Recipe) -> None:
    out.append("")
    out.append(header)
    leaves = [(k, v) for k, v in table.items() if not (isinstance(v, dict) and v)]
    subs = [(k, v) for k, v in table.items() if isinstance(v, dict) and v]
    lines = [(f"{toml_key(k)} = {toml_value(v)}", origin_label(recipe, (*key, k))) for k, v in leaves]
    pad = min(MAX_PAD, max((len(t) for t, _ in lines), default=0))
    out += [f"{text.ljust(pad)}  # {where}" for text, where in lines]
    for k, v in subs:
        _table(out, f"[{dotted}.{toml_key(k)}]", f"{dotted}.{toml_key(k)}", v, (*key, k), recipe)


def origins_by_key(recipe: Recipe) -> dict[str, Any]:
    """{dotted key: origin} of every leaf (for tests and tools)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, key: tuple[str, ...]) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, (*key, k))
        elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node) and len(key) == 1:
            for i, v in enumerate(node):
                walk(v, (*key, str(i)))
        else:
            flat[".".join(key)] = origin_label(recipe, key)

    walk(recipe.to_dict(include_sweep=True), ())
    return flat
