"""A results row's resolved recipe: what its runs ran, recorded in its JSON and checked in CI.

The record is the `recipe.toml` of the row's run directory — the engine writes it from the
recipe it built, defaults included, so it is exactly what ran — with the keys the pipeline
itself sets per run removed (`PIPELINE_KEYS`): `run.seed` (each seed is its own run; the
row's seeds are in the JSON beside it) and `run.out_dir` (the pipeline's temporary folder);
and each stage's checkpoint cadence (`CADENCE_KEYS`: `engram results run --checkpoint-every`
sets it so that a page run made across device sessions resumes runs mid-way; when and how
often a run saves does not change what it computes — a resumed run ends as the
uninterrupted one). What is left is the same for every seed of a row and the same on every
machine.

`engram results check` resolves the row's recipe again from today's code and files (the
JSON's recipe, overrides, sweep point and the pipeline's `--device`), removes the same keys,
and compares: a default, a recipe or a base it `extends` that changed since the row was made
shows up as the keys that differ.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

PIPELINE_KEYS = (("run", "seed"), ("run", "out_dir"))  # set by the pipeline per run, not by the row
CADENCE_KEYS = ("checkpoint_every",)  # of every stage: when a run saves, not what it computes
SHOWN_DIFFERENCES = 3
MISSING = object()


def normalised(tables: dict) -> str:
    """The recipe tables as TOML text, without the pipeline's per-run keys."""
    from ..recipe import to_toml

    tables = json.loads(json.dumps(tables))  # a deep copy of plain TOML data
    for section, key in PIPELINE_KEYS:
        if isinstance(tables.get(section), dict):
            tables[section].pop(key, None)
    for stage in tables.get("stages", []) if isinstance(tables.get("stages"), list) else []:
        if isinstance(stage, dict):
            for key in CADENCE_KEYS:
                stage.pop(key, None)
    return to_toml(tables)


def from_run_dir(run_dir: Path) -> str | None:
    """The resolved recipe a run directory holds (None when the run stopped before writing it)."""
    path = Path(run_dir) / "recipe.toml"
    if not path.is_file():
        return None
    return normalised(tomllib.loads(path.read_text(encoding="utf-8")))


def device_override(forced_device: str | None) -> list[str]:
    """The override `engram results run --device DEV` added to every run of the row."""
    return [f"run.device={json.dumps(forced_device)}"] if forced_device else []


def resolve_today(recipe_file: Path, overrides: list[str], point: dict | None, forced_device: str | None = None,
                  registry=None):
    """The row's recipe as today's code resolves it: what a re-run of the row would run
    (raises EngramError when it no longer resolves)."""
    from ..recipe import load_recipe, point_recipe

    recipe = load_recipe(recipe_file, [*overrides, *device_override(forced_device)], registry)
    return point_recipe(recipe, point, registry) if point is not None else recipe  # {}: a sweep over seeds only


def text_today(recipe) -> str:
    """A resolved Recipe in the recorded form."""
    from ..recipe import to_toml

    return normalised(tomllib.loads(to_toml(recipe.to_dict(include_sweep=False))))


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    if isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        out = {}
        for i, v in enumerate(node):
            out.update(_leaves(v, f"{prefix}.{i}"))
        return out
    return {prefix: node}


def differences(recorded: str, today: str, recipe=None) -> list[tuple[str, Any, Any]]:
    """(dotted key, recorded value, today's value) for every leaf that differs, in the order
    the keys appear in the recipe; a value missing on one side is `MISSING`. Given today's
    resolved `recipe`, a key the record lacks whose value today is its config field's default
    is not a difference: an option added since the row was made, at the default that keeps the
    earlier behaviour (whether the code under it changed is what `engram results stale` says)."""
    # the record normalised as today's is (a row recorded before a key left the record)
    old, new = _leaves(tomllib.loads(normalised(tomllib.loads(recorded)))), _leaves(tomllib.loads(today))
    keys = list(old) + [k for k in new if k not in old]
    return [(k, old.get(k, MISSING), new.get(k, MISSING)) for k in keys if old.get(k, MISSING) != new.get(k, MISSING)
            and not (k not in old and recipe is not None and added_at_default(recipe, k, new[k]))]


def added_at_default(recipe, key: str, value: Any) -> bool:
    """Whether `key` of the resolved `recipe` is a config field (of the run, a stage, or a
    component's config) holding its default `value`."""
    import attrs

    parts = key.split(".")
    try:
        if parts[0] in ("data", "head", "memory") and len(parts) == 2:
            obj, name = getattr(recipe, parts[0]).config, parts[1]
        elif parts[0] == "run" and len(parts) == 2:
            obj, name = recipe.run, parts[1]
        elif parts[0] == "metrics" and len(parts) == 3:
            obj, name = recipe.metrics[int(parts[1])].config, parts[2]
        elif parts[0] == "stages" and len(parts) == 4 and parts[2] == "objective":
            obj, name = recipe.objectives[int(parts[1])].config, parts[3]
        elif parts[0] == "stages" and len(parts) == 3:
            obj, name = recipe.stages[int(parts[1])], parts[2]
        else:
            return False
        field = attrs.fields_dict(type(obj))[name]
    except (AttributeError, IndexError, KeyError, ValueError, TypeError):
        return False
    if field.default is attrs.NOTHING:
        return False
    default = field.default.factory() if isinstance(field.default, attrs.Factory) else field.default
    return _plain(default) == _plain(value)


def _plain(v: Any) -> Any:
    """Tuples as lists (TOML has only arrays), to compare a default with a TOML value."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def show_value(v: Any) -> str:
    from ..recipe.toml import toml_value

    return "(absent)" if v is MISSING else toml_value(v)


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """`stages.0.lr 0.001 -> 0.002, ...` for the first few differences."""
    shown = ", ".join(f"{k} {show_value(a)} -> {show_value(b)}" for k, a, b in diffs[:SHOWN_DIFFERENCES])
    more = len(diffs) - SHOWN_DIFFERENCES
    return shown + (f" (+{more} more)" if more > 0 else "")


def spec_row_id(rid: str, d: dict) -> str:
    """The page spec's id of a JSON row (a sweep point `<id>.<NN>`, its point {} when the
    sweep is over seeds only, belongs to row `<id>`)."""
    return rid.rsplit(".", 1)[0] if d.get("point") is not None else rid


def unfinished_statuses(d: dict) -> str | None:
    """For a JSON row no run of which completed (a sweep a page run's deadline stopped before
    its choice: the JSON has no resolved recipe and no value, only how far each point got),
    its runs' statuses, e.g. "timeout"; None for a row with a completed run."""
    statuses = d.get("status") or []
    return None if "completed" in statuses else ", ".join(sorted(set(statuses))) or "none"
