"""Shell completion for `engram` and `engram-run` (argcomplete), set up in docs/cli.md.

Completes recipe paths (*.toml and folders), override keys from the recipe already on the
command line (every key of its resolved form, defaults included: ``head.<TAB>``), the
component names a ``*.type=`` key takes (``memory.type=<TAB>``; ``memory=none``), and
``engram describe KIND <TAB>``. Completing runs the command itself in a special mode.

Component names and a recipe's keys need the plugins imported (and with them torch, ~2 s);
a TAB should answer in well under a second, so both are remembered in
``<cache dir>/completion.json``: names per set of installed plugins (their entry points,
versions and the modification times of their source files, so an edited or newly installed
plugin is seen), a recipe's keys per the modification times of the files it is made of.
Only a miss pays the imports; the next TAB is quick.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
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
    store = _Store()
    names = store.data.get("names")
    if names is None:
        from .registry import load_registry

        reg = load_registry()
        names = {k: sorted({c.name for c in table.values()}) for k, table in reg.components.items()}
        store.data["names"] = names
        store.save()
    return names.get(kind, [])


def _source_mtime(folder: Path) -> int:
    """The newest modification time (ns) of a package's Python files (0 if none are found)."""
    try:
        return max((f.stat().st_mtime_ns for f in folder.rglob("*.py")), default=0)
    except OSError:
        return 0


def plugins_fingerprint() -> str:
    """What the component names depend on: the core's and every plugin's entry point, version
    and sources, and ENGRAM_PLUGINS. Found without importing any plugin."""
    import hashlib
    from importlib import metadata, util

    from . import __version__

    parts = [__version__, os.environ.get("ENGRAM_PLUGINS", "<every plugin>"), str(_source_mtime(Path(__file__).parent))]
    for ep in sorted(metadata.entry_points(group="engram"), key=lambda e: (e.name, e.value)):
        top = ep.value.split(":")[0].split(".")[0]
        try:
            spec = util.find_spec(top)  # a top-level name: located, not imported
        except (ImportError, ValueError):
            spec = None
        folders = list(spec.submodule_search_locations or []) if spec else []
        mtime = max((_source_mtime(Path(f)) for f in folders), default=0)
        parts.append(f"{ep.name}={ep.value}@{ep.dist.version if ep.dist else '?'}:{mtime}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """The rule of `engram_core.components.default_cache_dir` (a test keeps them equal),
    repeated here because that module imports torch."""
    if os.environ.get("ENGRAM_CACHE"):
        return Path(os.environ["ENGRAM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / "engram"


class _Store:
    """completion.json in the cache folder: {"fingerprint", "names", "recipes"}; a file from
    another set of plugins is ignored, and any problem reading or writing it is a miss."""

    def __init__(self) -> None:
        self.path = cache_dir() / "completion.json"
        self.fingerprint = plugins_fingerprint()
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            data = {"fingerprint": self.fingerprint}
        self.data = data

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".completion.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.data))
            tmp.replace(self.path)  # atomic: two shells completing at once never read half a file
        except OSError:
            pass


def _mtimes(files: list[str]) -> dict[str, int] | None:
    try:
        return {f: Path(f).stat().st_mtime_ns for f in files}
    except OSError:
        return None


def recipe_keys(recipe_path: str) -> list[str]:
    """Every dotted key of the recipe's resolved form (defaults included), remembered per the
    modification times of the recipe and its bases."""
    store = _Store()
    recipes = store.data.setdefault("recipes", {})
    where = str(Path(recipe_path).resolve())
    hit = recipes.get(where)
    if hit and _mtimes(list(hit["files"])) == hit["files"]:
        return hit["keys"]
    keys, files = _load_recipe_keys(recipe_path)
    stamps = _mtimes([where, *files])
    if stamps is not None:
        recipes[where] = {"files": stamps, "keys": keys}
        store.save()
    return keys


def _load_recipe_keys(recipe_path: str) -> tuple[list[str], list[str]]:
    """The keys (the recipe resolved; else as written, when it does not resolve) and the files read."""
    from .errors import EngramError
    from .recipe.extends import load_tree
    from .run.loggers import flatten

    try:
        tree, origins = load_tree(recipe_path)
    except EngramError:
        return [], []
    files = sorted({str(Path(label).resolve()) for label in origins.by_key.values() if Path(label).is_file()})
    try:
        from .recipe import load_recipe

        return list(flatten(load_recipe(recipe_path).to_dict())), files
    except EngramError:
        return list(flatten(tree)), files


def complete_override(prefix: str, parsed_args: Any = None, **_) -> list[str]:
    if "=" in prefix:  # a value: component names for *.type, none for the memory
        key, _, value = prefix.partition("=")
        kind = _kind_of_type_key(key)
        choices = _names(kind) if kind else (["none"] if key == "memory" else [])
        return [f"{key}={c}" for c in choices if c.startswith(value)]
    recipe_path = getattr(parsed_args, "recipe", None)
    keys: list[str] = recipe_keys(recipe_path) if recipe_path else []
    from .recipe import SECTIONS

    keys += [s for s in SECTIONS if not any(k.split(".")[0] == s for k in keys)]
    return [f"{k}=" for k in keys if k.startswith(prefix)]


def complete_component_name(prefix: str, parsed_args: Any = None, **_) -> list[str]:
    from .registry import KIND_ALIASES

    kind = KIND_ALIASES.get(getattr(parsed_args, "kind", "") or "")
    return [n for n in _names(kind) if n.startswith(prefix)] if kind else []
