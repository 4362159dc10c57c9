"""What a metric's values mean to a reader: which way is better, which group, which levels
to compare with. Declared on the metric class (`engram_core.components.Metric`):

    class MyAccuracy(Metric):
        directions = {"acc": "higher", "*/nll": "lower"}           # anything not named: "unknown"
        groups = {"params": "cost", "tokens_per_s": "cost"}          # default group: the tag's prefix
        references = {"acc": {"chance": lambda recipe: 1 / recipe["data"]["n_classes"]}}

Keys are the names `compute` returns, or globs over them; a name without a slash means the
tag ``eval/<name>``, as the engine logs it. A reference level is a number, the tag of
another value the metric reports (``"acc/chance"``), or a function of the run's resolved
recipe (a dict; returning None or raising means "no line").

The group ``cost`` marks what a run costs (parameters, speed, memory), not an outcome:
`engram report` leaves it out of outcome plots. The final table of a run prints each
metric's direction and flags a value that got worse from one evaluation stage to the next.
"""

from __future__ import annotations

import fnmatch
import json
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

HIGHER, LOWER, UNKNOWN = "higher", "lower", "unknown"
DIRECTIONS = (HIGHER, LOWER, UNKNOWN)
COST = "cost"
INFO_FILE = "metric_info.json"  # what the engine may write beside summary.json (see for_run)

# tags the engine itself logs (train/loss is an objective's value: lower is better)
ENGINE_DECLARATIONS = {
    "directions": {"train/loss": LOWER, "*/loss": LOWER},
    "groups": {"train/lr": "optimiser", "train/grad_norm": "optimiser"},
}


@attrs.frozen
class TagInfo:
    direction: str = UNKNOWN
    group: str = ""
    references: Mapping[str, Any] = attrs.field(factory=dict)  # label -> number | tag (resolved by `levels`)

    @property
    def arrow(self) -> str:
        """↑ (higher is better), ↓ (lower is better), or nothing."""
        return {HIGHER: "↑", LOWER: "↓"}.get(self.direction, "")

    @property
    def is_cost(self) -> bool:
        return self.group == COST

    def levels(self, values: Mapping[str, float]) -> dict[str, float]:
        """The reference levels as numbers; a tag is read from `values` (the same evaluation)."""
        out = {}
        for label, ref in self.references.items():
            v = values.get(ref) if isinstance(ref, str) else ref
            if isinstance(v, (int, float)) and math.isfinite(v):
                out[label] = float(v)
        return out


def tag_of(name: str) -> str:
    return name if "/" in name else f"eval/{name}"


def _match(patterns: Mapping[str, Any], tag: str) -> Any:
    """The value of the first pattern matching `tag` (exact names first, then globs in order)."""
    if tag in patterns:
        return patterns[tag]
    for pattern, value in patterns.items():
        if fnmatch.fnmatchcase(tag, pattern):
            return value
    return None


class MetricInfo:
    """Declarations of every metric of a run, answering `of(tag)`."""

    def __init__(self, declarations: Iterable[Mapping[str, Any]] = ()):
        self.declarations = [ENGINE_DECLARATIONS, *declarations]

    @classmethod
    def from_classes(cls, metric_classes: Iterable[Any], recipe: Mapping[str, Any] | None = None) -> MetricInfo:
        """From metric classes, or built metrics (an instance may set its own declarations)."""
        return cls(declaration_of(c, recipe or {}) for c in metric_classes)

    def of(self, tag: str) -> TagInfo:
        direction, group, refs = UNKNOWN, None, {}
        for decl in reversed(self.declarations):  # a metric's own declaration wins over the engine's
            direction = direction if direction != UNKNOWN else (_match(decl.get("directions", {}), tag) or UNKNOWN)
            group = group or _match(decl.get("groups", {}), tag)
            refs = refs or _match(decl.get("references", {}), tag) or {}
        return TagInfo(direction if direction in DIRECTIONS else UNKNOWN, group or tag.split("/")[0], dict(refs))

    def to_json(self) -> list[dict]:
        """The metrics' declarations as JSON data (what `for_run` reads from metric_info.json)."""
        return self.declarations[1:]


def write_for_run(run_dir: Path, metrics: Iterable[Any], recipe: Mapping[str, Any]) -> Path:
    """metric_info.json in `run_dir`: the declarations of the run's built metrics, references
    evaluated on its resolved recipe (what the engine can call once it has built them)."""
    path = Path(run_dir) / INFO_FILE
    path.write_text(json.dumps(MetricInfo.from_classes(metrics, recipe).to_json(), indent=1) + "\n")
    return path


def declaration_of(metric_cls: type, recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A metric class's declarations as plain data (tags for names, references evaluated on `recipe`)."""
    def tags(d: Mapping[str, Any]) -> dict[str, Any]:
        return {tag_of(k): v for k, v in (d or {}).items()}

    refs: dict[str, dict[str, Any]] = {}
    for name, levels in tags(getattr(metric_cls, "references", {})).items():
        resolved = {}
        for label, ref in levels.items():
            if callable(ref):
                try:
                    ref = ref(recipe)
                except Exception:  # a level that does not apply to this recipe (another data set)
                    ref = None
            if isinstance(ref, str):
                ref = tag_of(ref)
            if ref is not None:
                resolved[label] = ref
        refs[name] = resolved
    return {"directions": tags(getattr(metric_cls, "directions", {})), "groups": tags(getattr(metric_cls, "groups", {})),
            "references": refs}


def for_run(run_dir: Path) -> MetricInfo:
    """The declarations of a run's metrics: `metric_info.json` when the engine wrote one,
    else the metric classes of its recipe.toml, looked up in the installed plugins. Anything
    missing (an uninstalled plugin, a run directory from elsewhere) leaves its tags unknown."""
    run_dir = Path(run_dir)
    info_file = run_dir / INFO_FILE
    if info_file.exists():
        try:
            return MetricInfo(json.loads(info_file.read_text()))
        except (OSError, ValueError):
            pass
    try:
        recipe = tomllib.loads((run_dir / "recipe.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return MetricInfo()
    return MetricInfo.from_classes(_metric_classes(recipe), recipe)


def _metric_classes(recipe: Mapping[str, Any]) -> list[type]:
    from ..errors import EngramError
    from ..registry import load_registry

    try:
        reg = load_registry()
    except EngramError:
        return []
    out = []
    for entry in recipe.get("metrics") or []:
        name = entry.get("type") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            continue
        try:
            factory = reg.resolve("metrics", name, "metric").factory
        except EngramError:
            continue
        if isinstance(factory, type):
            out.append(factory)
    return out


def got_worse(info: TagInfo, before: float | None, after: float | None) -> bool:
    """True when the value moved against its declared direction (a finite value becoming
    non-finite counts as worse; an unknown direction never does)."""
    if info.direction == UNKNOWN or before is None or after is None:
        return False
    if math.isfinite(before) and not math.isfinite(after):
        return not (info.direction == HIGHER and after == math.inf) and not (info.direction == LOWER and after == -math.inf)
    if not (math.isfinite(before) and math.isfinite(after)):
        return False
    # float32 rounding, not a change: the same evaluation summed in another order differs by ~1e-7
    tol = 1e-6 * max(abs(before), abs(after)) + 1e-12
    return after < before - tol if info.direction == HIGHER else after > before + tol
