"""The `[sweep]` grid: its points, their labels, and the recipe of one point."""

from __future__ import annotations

import copy
import itertools
from typing import Any

from ..errors import RecipeError
from ..registry import Registry, load_registry
from .load import apply_override
from .resolve import resolve
from .schema import Recipe

# ---- sweeps ---------------------------------------------------------------------------


def sweep_points(recipe: Recipe) -> list[tuple[str, dict[str, Any]]]:
    """(label, {path: value}) for every grid point, in a stable order."""
    keys = list(recipe.sweep)
    out = []
    for combo in itertools.product(*(recipe.sweep[k] for k in keys)):
        point = dict(zip(keys, combo))
        label = ",".join(f"{k}={value_label(v)}" for k, v in point.items())
        out.append((label, point))
    return out


def then_points(recipe: Recipe, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, point) of each run `[select] then` asks for: the chosen grid point with each
    combination of `then`'s values, in a stable order."""
    then = recipe.select.then if recipe.select is not None else {}
    keys = list(then)
    out = []
    for combo in itertools.product(*(then[k] for k in keys)):
        point = {**chosen, **dict(zip(keys, combo))}
        out.append((",".join(f"{k}={value_label(v)}" for k, v in point.items()), point))
    return out


def value_label(v: Any) -> str:
    if isinstance(v, dict):  # a component by its type, a stage by its name
        return str(v.get("type") or v.get("name") or "table")
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def point_recipe(recipe: Recipe, point: dict[str, Any], registry: Registry | None = None) -> Recipe:
    raw = copy.deepcopy(recipe.raw)
    raw.pop("sweep", None)
    raw.pop("select", None)
    try:
        for k, v in point.items():
            apply_override(raw, k, v, what="sweep")
    except RecipeError as exc:
        raise exc.with_file(recipe.file) from None
    try:
        return resolve(raw, registry or load_registry(), recipe.file)
    except RecipeError as exc:
        raise exc.with_file(recipe.file) from None
