"""Recipes: TOML → validated attrs configs, with inheritance, overrides and a sweep grid.

- `schema`  the tables as attrs classes (`RunConfig`, `TrainStage`, `FitStage`, `EvalStage`,
            `Resolved`, `Recipe`)
- `toml`    the one TOML reader (one-line errors) and the writer of resolved recipes
- `extends` `extends = "base.toml"` inheritance, with each value's origin
- `load`    `load_recipe`: read, inherit, apply `key=value` overrides, resolve
- `resolve` every table structured and checked, components looked up, capabilities matched
- `grid`    the `[sweep]` grid's points and the recipe of one point
"""

from .grid import point_recipe, sweep_points, then_points, value_label
from .load import apply_override, load_recipe, parse_override, parse_value, split_key
from .resolve import check_capabilities, resolve
from .schema import (
    DEVICE_ALIASES,
    DEVICE_WORDS,
    MAX_SWEEP_POINTS,
    NONE_WORD,
    OPTIONAL_TABLES,
    SECTIONS,
    STAGE_CLASSES,
    EvalStage,
    FitStage,
    ParamGroupConfig,
    Recipe,
    Resolved,
    RunConfig,
    SelectConfig,
    Stage,
    TrainStage,
)
from .toml import read_toml, to_toml

__all__ = [
    "DEVICE_ALIASES", "DEVICE_WORDS", "MAX_SWEEP_POINTS", "NONE_WORD", "OPTIONAL_TABLES", "SECTIONS", "STAGE_CLASSES",
    "EvalStage", "FitStage", "ParamGroupConfig", "Recipe", "Resolved", "RunConfig", "SelectConfig", "Stage", "TrainStage",
    "apply_override", "check_capabilities", "load_recipe", "parse_override", "parse_value", "point_recipe", "read_toml",
    "resolve", "split_key", "sweep_points", "then_points", "to_toml", "value_label",
]
