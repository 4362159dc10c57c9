"""Shell completion for `engram` and `engram-run` (argcomplete), set up in docs/cli.md.

Completes recipe paths (*.toml and folders), override keys from the recipe already on the
command line (every key of its resolved form, defaults included: ``head.<TAB>``), the
component names a ``*.type=`` key takes (``memory.type=<TAB>``; ``memory=none``), and
``engram describe KIND <TAB>``. Completing runs the command itself in a special mode, so
override keys cost one recipe load (about as long as ``engram validate``).
"""

from __future__ import annotations

import os
from typing import Any

TYPE_KINDS = {"data": "datasets", "head": "heads", "memory": "memories", "objective": "objectives", "metrics": "metrics"}


def enabled() -> bool:
    return "_ARGCOMPLETE" in os.environ


def autocomplete(parser) -> None:
    """Answer a completion request and exit, or return at once when there is none."""
    if not enabled():
        return
    import argcomplete

    argcomplete.autocomplete(parser)


def recipe_files(action) -> None:
    from argcomplete.completers import FilesCompleter

    action.completer = FilesCompleter(allowednames=("toml",), directories=True)


def overrides(action) -> None:
    action.completer = complete_override


def component_names(action) -> None:
    action.completer = complete_component_name


def _kind_of_type_key(key: str) -> str | None:
    """`memory.type` -> memories, `stages.1.objective.type` -> objectives, `metrics.0.type` -> metrics."""
    parts = key.split(".")
    if parts[-1] != "type" or len(parts) < 2:
        return None
    owner = parts[-2] if not parts[-2].isdigit() else parts[-3] if len(parts) >= 3 else ""
    return TYPE_KINDS.get(owner)


def _names(kind: str) -> list[str]:
    from .registry import load_registry

    return sorted({c.name for c in load_registry().components[kind].values()})


def complete_override(prefix: str, parsed_args: Any = None, **_) -> list[str]:
    if "=" in prefix:  # a value: component names for *.type, none for the memory
        key, _, value = prefix.partition("=")
        kind = _kind_of_type_key(key)
        choices = _names(kind) if kind else (["none"] if key == "memory" else [])
        return [f"{key}={c}" for c in choices if c.startswith(value)]
    recipe_path = getattr(parsed_args, "recipe", None)
    keys: list[str] = []
    if recipe_path:
        from .errors import EngramError
        from .loggers import flatten
        from .recipe import load_recipe

        try:
            keys = list(flatten(load_recipe(recipe_path).to_dict()))
        except EngramError:
            from .inherit import load_tree

            try:
                keys = list(flatten(load_tree(recipe_path)[0]))
            except EngramError:
                keys = []
    from .recipe import SECTIONS

    keys += [s for s in SECTIONS if not any(k.split(".")[0] == s for k in keys)]
    return [f"{k}=" for k in keys if k.startswith(prefix)]


def complete_component_name(prefix: str, parsed_args: Any = None, **_) -> list[str]:
    from .cli import KIND_ALIASES

    kind = KIND_ALIASES.get(getattr(parsed_args, "kind", "") or "")
    return [n for n in _names(kind) if n.startswith(prefix)] if kind else []
