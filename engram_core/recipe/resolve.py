"""Resolving a recipe: every table structured into its attrs config, components looked up in the
registry, capabilities checked. Collects *every* problem before reporting (one line each), before
anything heavy is built."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import attrs

from ..config import (
    ConfigProblems,
    structure,
)
from ..errors import ConfigError, RecipeError, did_you_mean
from ..registry import KIND_SINGULAR, Registry
from ..run.rundir import run_name_problem
from .schema import (
    MAX_SWEEP_POINTS,
    NONE_WORD,
    SECTIONS,
    STAGE_CLASSES,
    FitStage,
    Recipe,
    Resolved,
    RunConfig,
    SelectConfig,
    Stage,
    TrainStage,
)


def _sweep_table(sweep: Any, problems: list) -> dict:
    """The [sweep] table, its shape checked (problems appended); {} when it is not a table."""
    if not isinstance(sweep, dict):
        problems.append(("sweep", "expected a table of dotted paths to lists"))
        return {}
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            problems.append((f"sweep.{key}", "expected a non-empty list of values"))
        if key.split(".")[0] == "sweep":
            problems.append((f"sweep.{key}", "a sweep cannot sweep itself"))
    sizes = {k: len(v) for k, v in sweep.items() if isinstance(v, list)}
    if math.prod(sizes.values()) > MAX_SWEEP_POINTS:  # said at once, before each point is built and checked
        shown = " x ".join(f"{n} ({k})" for k, n in sizes.items())
        problems.append(("sweep", f"a grid of {math.prod(sizes.values()):,} points ({shown}) is more than {MAX_SWEEP_POINTS:,}; "
                                  "sweep fewer values, or split it into several recipes"))
    return sweep


def _select_table(table: Any, sweep: dict, problems: list) -> SelectConfig | None:
    """The [select] table structured and checked against the [sweep] it chooses from."""
    select = _structure(table, SelectConfig, "select", problems)
    if select is None:
        return None
    if not sweep:
        problems.append(("select", "chooses among the points of a [sweep]; the recipe has none"))
    for key, values in select.then.items():
        if not isinstance(values, list) or not values:
            problems.append((f"select.then.{key}", "expected a non-empty list of values"))
        elif key in sweep:
            problems.append((f"select.then.{key}", "the grid sweeps it already; `then` re-runs the chosen point with keys it does not sweep"))
        elif key.split(".")[0] in ("sweep", "select"):
            problems.append((f"select.then.{key}", "expected a dotted path of the recipe (e.g. run.seed)"))
    return select


def resolve(raw: dict, reg: Registry, file: str) -> Recipe:
    """The raw recipe table as a `Recipe`: every problem found, one line each, in one RecipeError."""
    problems: list[tuple[str, str]] = []
    for key in raw:
        if key not in SECTIONS:
            problems.append((key, f"unknown section{did_you_mean(key, SECTIONS)}; sections: {', '.join(SECTIONS)}"))
    run = _structure(raw.get("run", {}), RunConfig, "run", problems)
    if run is not None and not run.name and run_name_problem(Path(file).stem):  # `...toml` has the stem `..`
        problems.append(("run.name", f"missing, and the recipe file's name {Path(file).stem!r} cannot name a run folder "
                                     "(it would leave run.out_dir): set run.name to a plain folder name"))
    data = head = memory = None
    for key, kind in (("data", "datasets"), ("head", "heads")):
        if key not in raw:
            problems.append((key, f"missing required table [{key}]"))
        elif key == "data":
            data = _component(reg, kind, raw[key], key, problems)
        else:
            head = _component(reg, kind, raw[key], key, problems)
    if raw.get("memory") not in (None, NONE_WORD):
        memory = _component(reg, "memories", raw["memory"], "memory", problems)
    stages, objectives = _stages(raw.get("stages", []), reg, problems)
    metrics: list[Resolved] = []
    raw_metrics = raw.get("metrics", [])
    if not isinstance(raw_metrics, list):
        problems.append(("metrics", "expected [[metrics]] entries"))
        raw_metrics = []
    for i, m in enumerate(raw_metrics):
        r = _component(reg, "metrics", m, f"metrics.{i}", problems)
        if r is not None:
            metrics.append(r)
    sweep = _sweep_table(raw.get("sweep", {}), problems)
    select = _select_table(raw["select"], sweep, problems) if "select" in raw else None
    if not problems:
        problems.extend(_check_stage_references(stages, metrics, memory))
        problems.extend(_check_optimizers(stages, reg))
    if not problems and data and head:
        problems.extend(check_capabilities(data, head, memory, objectives, metrics))
    if problems:
        raise RecipeError(problems, file=file)
    assert data is not None and head is not None and run is not None
    return Recipe(file, run, data, head, memory, stages, objectives, metrics, sweep, raw, select=select)


def _component(reg: Registry, kind: str, table: Any, path: str, problems: list) -> Resolved | None:
    """One component table (`type` plus its config keys) looked up and structured; None after a problem."""
    if not isinstance(table, dict):
        problems.append((path, f"expected a table with a 'type' key, got {type(table).__name__}"))
        return None
    if "type" not in table:
        problems.append((f"{path}.type", f"missing required key (which {KIND_SINGULAR[kind]}: one of {', '.join(sorted({c.name for c in reg.components[kind].values()}))})"))
        return None
    type_name = table["type"]
    if not isinstance(type_name, str):
        problems.append((f"{path}.type", f"expected a string, got {type_name!r}"))
        return None
    try:
        comp = reg.resolve(kind, type_name, f"{path}.type")
    except RecipeError as exc:
        problems.extend(exc.problems)
        return None
    cfg = _structure({k: v for k, v in table.items() if k != "type"}, comp.config_cls, path, problems)
    if cfg is None:
        return None
    out = Resolved(comp, cfg, path, type_name)
    # a composite (weighted_sum) names its parts: each is resolved and checked like a top-level one
    parts = getattr(comp.factory, "sub_components", None)
    for suffix, sub_kind, sub_table in (parts(cfg) if parts is not None else ()):
        child = _component(reg, sub_kind, sub_table, f"{path}.{suffix}", problems)
        if child is not None:
            out.children.append(child)
    return out


def _stages(raw_stages: Any, reg: Registry, problems: list) -> tuple[list[Stage], dict[int, Resolved]]:
    """The [[stages]] entries structured (names filled in and unique) and each train stage's objective."""
    stages: list[Stage] = []
    objectives: dict[int, Resolved] = {}
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append(("stages", "expected at least one [[stages]] entry"))
        return stages, objectives
    names: dict[str, int] = {}
    for i, st in enumerate(raw_stages):
        path = f"stages.{i}"
        if not isinstance(st, dict):
            problems.append((path, "expected a table"))
            continue
        kind = st.get("kind", "train")
        if kind not in STAGE_CLASSES:
            problems.append((f"{path}.kind", f"must be one of 'train', 'fit', 'eval', got {kind!r}{did_you_mean(str(kind), STAGE_CLASSES)}"))
            continue
        stage = _structure(st, STAGE_CLASSES[kind], path, problems)
        if stage is None:
            continue
        if not stage.name:
            stage = attrs.evolve(stage, name=f"stage{i}")
        if stage.name in names:
            problems.append((f"{path}.name", f"duplicate stage name {stage.name!r} (also stages.{names[stage.name]})"))
        names[stage.name] = i
        stages.append(stage)
        if isinstance(stage, TrainStage):
            obj = _component(reg, "objectives", stage.objective, f"{path}.objective", problems)
            if obj is not None:
                objectives[i] = obj
    return stages, objectives


def _structure(data: Any, cls: type, path: str, problems: list) -> Any:
    try:
        return structure(data, cls, path)
    except ConfigProblems as exc:
        problems.extend(exc.problems)
    except ConfigError as exc:
        problems.append((f"{path}.{exc.key}" if exc.key else path, exc.message))
    return None


def _check_optimizers(stages, registry: Registry) -> list[tuple[str, str]]:
    """Every optimizer a train stage or parameter group names is registered."""

    known = sorted(registry.extensions["optimizers"])
    problems = []
    for i, st in enumerate(stages):
        if not isinstance(st, TrainStage):
            continue
        named = [(f"stages.{i}.optimizer", st.optimizer)]
        named += [(f"stages.{i}.param_groups.{j}.optimizer", g.optimizer) for j, g in enumerate(st.param_groups) if g.optimizer is not None]
        for path, name in named:
            if name not in known:
                problems.append((path, f"unknown optimizer {name!r}{did_you_mean(name, known)}; optimizers: {', '.join(known)}"))
            elif st.optimizer_impl != "auto" and st.optimizer_impl not in registry.extensions["optimizers"][name].implementations:
                has = registry.extensions["optimizers"][name].implementations
                problems.append((f"stages.{i}.optimizer_impl", f"optimizer {name!r} ({path}) has no {st.optimizer_impl!r} implementation; "
                                 f"it has {', '.join(repr(x) for x in ('auto', *has))}: set optimizer_impl = 'auto'"))
                break
    return problems


def _check_stage_references(stages, metrics, memory) -> list[tuple[str, str]]:
    problems = []
    names = [m.component.name for m in metrics] + [m.type_as_written for m in metrics]
    for i, st in enumerate(stages):
        for j, m in enumerate(getattr(st, "metrics", None) or ()):
            if m not in names:
                problems.append((f"stages.{i}.metrics.{j}", f"no [[metrics]] entry of type {m!r}{did_you_mean(m, names)}"))
        if isinstance(st, FitStage):
            if st.target == "memory" and memory is None:
                problems.append((f"stages.{i}.target", "fit stage targets the memory, but the recipe has no [memory]"))
    return problems


def check_capabilities(data: Resolved, head: Resolved, memory: Resolved | None, objectives: dict, metrics: list) -> list[tuple[str, str]]:
    """Every requirement met by the capabilities the data set, head or memory provides; the
    memory attachable at one of the points the head offers."""
    problems = []
    offered = {
        "data": (data.component, set(data.component.provides)),
        "head": (head.component, set(head.component.provides)),
    }
    if memory is not None:
        offered["memory"] = (memory.component, set(memory.component.provides))
        points = set(memory.component.points) & set(head.component.points)
        if memory.component.points and not points:
            problems.append(
                (
                    "memory.type",
                    f"memory '{memory.type_as_written}' attaches at {_fmt(memory.component.points)}, "
                    f"but head '{head.type_as_written}' offers {_fmt(head.component.points)}",
                )
            )
        if memory.component.requires:
            have = set(head.component.provides) | set(data.component.provides)
            missing = [r for r in memory.component.requires if r not in have]
            if missing:
                problems.append(("memory.type", f"memory '{memory.type_as_written}' requires {_fmt(missing)}, but head '{head.type_as_written}' provides {_fmt(head.component.provides)}"))
    have = set().union(*(p for _, p in offered.values()))
    users = [(f"{p.path}.type", "objective", p) for o in objectives.values() for p in o.walk()]
    users += [(f"{p.path}.type", "metric", p) for m in metrics for p in m.walk()]
    for path, what, r in users:
        missing = [c for c in r.component.requires if c not in have]
        if missing:
            problems.append(
                (
                    path,
                    f"{what} '{r.type_as_written}' requires {_fmt(missing)}, but head '{head.type_as_written}' provides "
                    f"{_fmt(head.component.provides)}"
                    + (f", memory '{memory.type_as_written}' provides {_fmt(memory.component.provides)}" if memory else "")
                    + f" and data set '{data.type_as_written}' provides {_fmt(data.component.provides)}",
                )
            )
    return problems


def _fmt(caps) -> str:
    caps = list(caps)
    return ", ".join(f"'{c}'" for c in caps) if caps else "nothing"
