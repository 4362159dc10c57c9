"""Recipes: TOML → validated attrs configs, with overrides, sweeps and resolved output.

Loading collects *every* problem before reporting (one line each), and checks the
components' capabilities before anything heavy is built.
"""

from __future__ import annotations

import copy
import itertools
import math
import tomllib
from pathlib import Path
from typing import Any

import attrs
import tomli_w

from .config import (
    ConfigProblems,
    adam_betas,
    field,
    finite_non_negative,
    finite_positive,
    in_range,
    non_negative,
    one_of,
    positive,
    structure,
    unstructure,
)
from .errors import ConfigError, RecipeError, did_you_mean
from .registry import KIND_SINGULAR, Component, Registry, load_registry
from .rundir import run_name_problem

MAX_SWEEP_POINTS = 10_000  # every point is built and checked before the first runs
SECTIONS = ("run", "data", "head", "memory", "stages", "metrics", "sweep")
OPTIONAL_TABLES = ("memory",)
NONE_WORD = "none"


# ---- the recipe's own tables -------------------------------------------------------------


DEVICE_WORDS = ("auto", "cpu", "cuda", "mps")
DEVICE_ALIASES = {"gpu": "cuda", "cuda0": "cuda:0", "nvidia": "cuda", "cpu0": "cpu", "metal": "mps"}


# a run directory is `<name>/<stamp>-<id><suffix>`: the name leaves room for the rest in 255 bytes
def _run_name(inst, attribute, value):
    problem = run_name_problem(value) if value else None
    if problem:
        raise ConfigError(attribute.name, problem)


@attrs.frozen
class RunConfig:
    name: str = field("", help="run name (one folder name); default: the recipe file's stem", validator=_run_name)
    seed: int = field(0, help="seeds torch, the training sampler and component factories (0 to 2**32-1)",
                      validator=in_range(0, 2**32 - 1))
    device: str = field("auto", help="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'")
    out_dir: str = field("runs", help="parent folder of run directories")
    precision: str = field(
        "fp32", help="'fp32', 'bf16' (autocast, fp32 weights) or 'fp16' (autocast with a GradScaler)", validator=one_of("fp32", "bf16", "fp16")
    )
    compile: bool = field(False, help="torch.compile the training forward (objective, head, memory); evaluation stays eager")
    cuda_graphs: bool = field(False, help="replay each training step as one CUDA graph after 3 eager steps (CUDA, one process)")
    loggers: tuple[str, ...] = field((), help="trackers beside TensorBoard: 'wandb', 'mlflow' (extras of engram-core) or a plugin's")
    threads: int = field(0, help="CPU threads (torch intra-op) of this run; 0 = auto: the cores shared out between the engram runs of the machine (OMP_NUM_THREADS, when set, wins over auto)", validator=non_negative)

    def __attrs_post_init__(self):
        d = self.device
        if not (d in DEVICE_WORDS or (d.startswith("cuda:") and d[5:].isdecimal() and d.isascii())):
            hint = DEVICE_ALIASES.get(d.lower()) or did_you_mean(d, DEVICE_WORDS)
            hint = f" (did you mean '{hint}'?)" if hint and not hint.startswith(" ") else hint
            raise ConfigError("device", f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {d!r}{hint}")


# Past these an optimiser's float32 arithmetic overflows (a traceback at step 1, not a
# diverged loss): lr / (1 - beta1) and lr * weight_decay must stay below float32's 3.4e38.
# No setting in use comes near them; a huge lr that diverges is still the user's to try.
MAX_LR = 1e30
MAX_WEIGHT_DECAY = 1e6


def _rate(what: str, bound: float, check):
    def validator(inst, attribute, value):
        check(inst, attribute, value)
        if value is not None and value > bound:
            raise ConfigError(attribute.name, f"must be <= {bound:g}, got {value!r} (a {what} that large overflows the "
                                              "optimiser's float32 arithmetic; typical values are 1e-5 to 1e-1)")
    return validator


learning_rate = _rate("learning rate", MAX_LR, finite_positive)
decay_rate = _rate("weight decay", MAX_WEIGHT_DECAY, finite_non_negative)


@attrs.frozen
class ParamGroupConfig:
    params: tuple[str, ...] = field(help="glob patterns of parameter names in this group")
    lr: float | None = field(None, help="learning rate (default: the stage's)", validator=learning_rate)
    weight_decay: float | None = field(None, help="weight decay (default: the stage's)", validator=decay_rate)
    optimizer: str | None = field(None, help="optimizer for this group (default: the stage's): a registered name (`engram_core.optim`)")


@attrs.frozen
class TrainStage:
    objective: dict = field(help="component table of the objective: { type = ..., ... }")
    steps: int = field(help="optimisation steps", validator=positive)
    name: str = field("", help="stage name (unique); default stage<i>")
    kind: str = field("train", help="'train'")
    batch_size: int = field(64, help="examples per optimizer step, over all ranks and micro-batches", validator=positive)
    grad_accum: int = field(1, help="micro-batches per optimizer step (gradient accumulation); batch_size is split into them", validator=positive)
    optimizer: str = field(
        "adamw", help="'adamw', 'adam', 'sgd', 'sparse_adam', 'rowwise_adagrad', 'rowwise_adam' or a plugin's (engram_core.optim)"
    )
    lr: float = field(1e-3, help="peak learning rate (finite, > 0, <= 1e30)", validator=learning_rate)
    weight_decay: float = field(0.0, help="weight decay (finite, >= 0, <= 1e6)", validator=decay_rate)
    betas: tuple[float, float] = field((0.9, 0.999), help="Adam betas: two values in [0, 1)", validator=adam_betas)
    momentum: float = field(0.0, help="SGD momentum, in [0, 1]", validator=in_range(0.0, 1.0))
    schedule: str = field("constant", help="'constant', 'cosine' or 'linear'", validator=one_of("constant", "cosine", "linear"))
    warmup_steps: int = field(0, help="linear warm-up steps", validator=non_negative)
    min_lr_ratio: float = field(0.0, help="lr at the end of a decay, as a fraction of lr", validator=in_range(0.0, 1.0))
    grad_clip: float = field(0.0, help="max global gradient norm; 0 = off", validator=finite_non_negative)
    eval_every: int = field(0, help="steps between evaluations; 0 = only at the stage's end", validator=non_negative)
    checkpoint_every: int = field(0, help="steps between checkpoints; 0 = at the stage's end", validator=non_negative)
    log_every: int = field(10, help="steps between train/* scalars", validator=positive)
    train: tuple[str, ...] = field(("*",), help="glob patterns of parameters that train")
    freeze: tuple[str, ...] = field((), help="glob patterns of parameters frozen even if `train` matches")
    param_groups: tuple[ParamGroupConfig, ...] = field((), help="per-group lr / weight decay / optimizer")
    memory: bool = field(True, help="whether the memory is active during this stage")
    split: str = field("train", help="split the objective samples from")
    eval_split: str = field("eval", help="split the metrics run on")
    metrics: tuple[str, ...] | None = field(None, help="metric types to run (default: all)")


@attrs.frozen
class FitStage:
    name: str = field("", help="stage name (unique)")
    kind: str = field("fit", help="'fit'")
    target: str = field("memory", help="'head', 'memory' or 'data'", validator=one_of("head", "memory", "data"))
    action: str = field("fit", help="method of the target to call: target.action(ctx, **options)")
    options: dict = field(factory=dict, help="keyword arguments of the action")
    batch_size: int = field(256, help="batch size handed to the action", validator=positive)
    split: str = field("train", help="split the action reads")
    memory: bool = field(True, help="whether the memory is active while the action runs")


@attrs.frozen
class EvalStage:
    name: str = field("", help="stage name (unique); it names the column in the final table")
    kind: str = field("eval", help="'eval'")
    split: str = field("eval", help="split the metrics run on")
    batch_size: int = field(256, help="eval batch size", validator=positive)
    memory: bool = field(True, help="false knocks the memory out for this evaluation")
    metrics: tuple[str, ...] | None = field(None, help="metric types to run (default: all)")


STAGE_CLASSES = {"train": TrainStage, "fit": FitStage, "eval": EvalStage}
Stage = TrainStage | FitStage | EvalStage


@attrs.define
class Resolved:
    """A component table resolved against the registry."""

    component: Component
    config: Any
    path: str
    type_as_written: str
    children: list[Resolved] = attrs.field(factory=list)  # parts of a composite (weighted_sum terms)

    def walk(self):
        """This component, then every part of it, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def to_table(self) -> dict:
        return {"type": self.type_as_written, **unstructure(self.config)}


@attrs.define
class Recipe:
    file: str
    run: RunConfig
    data: Resolved
    head: Resolved
    memory: Resolved | None
    stages: list[Stage]
    objectives: dict[int, Resolved]
    metrics: list[Resolved]
    sweep: dict[str, list]
    raw: dict  # the raw tables after overrides (sweep points start from it)
    origins: Any = None  # engram_core.inherit.Origins: the file (or override) of each value in raw

    @property
    def name(self) -> str:
        return self.run.name or Path(self.file).stem

    def to_dict(self, include_sweep: bool = True) -> dict:
        out: dict[str, Any] = {"run": unstructure(attrs.evolve(self.run, name=self.name))}
        out["data"] = self.data.to_table()
        out["head"] = self.head.to_table()
        if self.memory is not None:
            out["memory"] = self.memory.to_table()
        stages = []
        for i, st in enumerate(self.stages):
            d = unstructure(st)
            d = {"name": d.pop("name"), "kind": d.pop("kind"), **d}
            if isinstance(st, TrainStage):
                d["objective"] = self.objectives[i].to_table()
            stages.append(d)
        out["stages"] = stages
        out["metrics"] = [m.to_table() for m in self.metrics]
        if include_sweep and self.sweep:
            out["sweep"] = self.sweep
        return out

    def to_toml(self, include_sweep: bool = True) -> str:
        return to_toml(self.to_dict(include_sweep))


def _toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return tomli_w.dumps({"v": v})[4:].strip()


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else tomli_w.dumps({k: 0}).split(" = ")[0]


def to_toml(data: dict) -> str:
    """A recipe as a user would write it: [tables], [[stages]], [[metrics]], inline sub-tables."""
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, list) and all(isinstance(x, dict) for x in value):
            for item in value:
                out.append(f"[[{key}]]")
                out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items()]
                out.append("")
        elif isinstance(value, dict):
            out.append(f"[{key}]")
            out += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()]
            out.append("")
        else:
            out.insert(0, f"{_toml_key(key)} = {_toml_value(value)}")
    return "\n".join(out)


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


# ---- loading --------------------------------------------------------------------------


BOM = "\ufeff"


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise RecipeError([("", "recipe file not found")], file=str(path))
    if p.is_dir():
        tomls = sorted(x.name for x in p.glob("*.toml"))[:3]
        hint = f" (it holds {', '.join(tomls)})" if tomls else ""
        raise RecipeError([("", f"is a folder, not a recipe file{hint}; give the path of a .toml file")], file=str(path))
    try:
        text = p.read_text(encoding="utf-8")
        if text.startswith(BOM):
            raise RecipeError([("", "the file starts with a UTF-8 byte-order mark (BOM), which TOML does not allow; "
                                    "save it as UTF-8 without BOM")], file=str(path))
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([("", f"TOML syntax error: {exc}")], file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([("", f"not UTF-8 text: {exc}")], file=str(path)) from None
    except ValueError as exc:  # an integer past sys.get_int_max_str_digits (not a TOMLDecodeError)
        raise RecipeError([("", f"a value cannot be read ({str(exc).splitlines()[0][:120]}); give numbers of ordinary size")],
                          file=str(path)) from None


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    registry: Registry | None = None,
    raw: dict | None = None,
) -> Recipe:
    """Read, override, validate and resolve a recipe. Raises RecipeError with every problem."""
    from .inherit import attribute, load_tree

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


def resolve(raw: dict, reg: Registry, file: str) -> Recipe:
    problems: list[tuple[str, str]] = []

    for key in raw:
        if key not in SECTIONS:
            problems.append((key, f"unknown section{did_you_mean(key, SECTIONS)}; sections: {', '.join(SECTIONS)}"))

    run = _structure(raw.get("run", {}), RunConfig, "run", problems)
    if run is not None and not run.name and run_name_problem(Path(file).stem):  # `...toml` has the stem `..`
        problems.append(("run.name", f"missing, and the recipe file's name {Path(file).stem!r} cannot name a run folder "
                                     "(it would leave run.out_dir): set run.name to a plain folder name"))

    def component(kind: str, table: Any, path: str) -> Resolved | None:
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
        body = {k: v for k, v in table.items() if k != "type"}
        cfg = _structure(body, comp.config_cls, path, problems)
        if cfg is None:
            return None
        out = Resolved(comp, cfg, path, type_name)
        # a composite (weighted_sum) names its parts: each is resolved and checked like a top-level one
        parts = getattr(comp.factory, "sub_components", None)
        for suffix, sub_kind, sub_table in (parts(cfg) if parts is not None else ()):
            child = component(sub_kind, sub_table, f"{path}.{suffix}")
            if child is not None:
                out.children.append(child)
        return out

    data = head = memory = None
    if "data" not in raw:
        problems.append(("data", "missing required table [data]"))
    else:
        data = component("datasets", raw["data"], "data")
    if "head" not in raw:
        problems.append(("head", "missing required table [head]"))
    else:
        head = component("heads", raw["head"], "head")
    if raw.get("memory") not in (None, NONE_WORD):
        memory = component("memories", raw["memory"], "memory")

    stages: list[Stage] = []
    objectives: dict[int, Resolved] = {}
    raw_stages = raw.get("stages", [])
    if not isinstance(raw_stages, list) or not raw_stages:
        problems.append(("stages", "expected at least one [[stages]] entry"))
        raw_stages = []
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
        cls = STAGE_CLASSES[kind]
        stage = _structure(st, cls, path, problems)
        if stage is None:
            continue
        if not stage.name:
            stage = attrs.evolve(stage, name=f"stage{i}")
        if stage.name in names:
            problems.append((f"{path}.name", f"duplicate stage name {stage.name!r} (also stages.{names[stage.name]})"))
        names[stage.name] = i
        stages.append(stage)
        if isinstance(stage, TrainStage):
            obj = component("objectives", stage.objective, f"{path}.objective")
            if obj is not None:
                objectives[i] = obj

    metrics: list[Resolved] = []
    raw_metrics = raw.get("metrics", [])
    if not isinstance(raw_metrics, list):
        problems.append(("metrics", "expected [[metrics]] entries"))
        raw_metrics = []
    for i, m in enumerate(raw_metrics):
        r = component("metrics", m, f"metrics.{i}")
        if r is not None:
            metrics.append(r)

    sweep = _sweep_table(raw.get("sweep", {}), problems)

    if not problems:
        problems.extend(_check_stage_references(stages, metrics, memory))
        problems.extend(_check_optimizers(stages, reg))
    if not problems and data and head:
        problems.extend(check_capabilities(data, head, memory, objectives, metrics))
    if problems:
        raise RecipeError(problems, file=file)
    assert data is not None and head is not None and run is not None
    return Recipe(file, run, data, head, memory, stages, objectives, metrics, sweep, raw)


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
    from .optim import registered_optimizers

    known = sorted(registered_optimizers(registry))
    problems = []
    for i, st in enumerate(stages):
        if not isinstance(st, TrainStage):
            continue
        named = [(f"stages.{i}.optimizer", st.optimizer)]
        named += [(f"stages.{i}.param_groups.{j}.optimizer", g.optimizer) for j, g in enumerate(st.param_groups) if g.optimizer is not None]
        for path, name in named:
            if name not in known:
                problems.append((path, f"unknown optimizer {name!r}{did_you_mean(name, known)}; optimizers: {', '.join(known)}"))
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
    """Every requirement met by what the data set, head or memory provides; memory attachable."""
    problems = []
    offered = {
        "data": (data.component, set(data.component.provides)),
        "head": (head.component, set(head.component.provides)),
    }
    if memory is not None:
        offered["memory"] = (memory.component, set(memory.component.provides))
        points = set(memory.component.provides) & set(head.component.offers)
        if memory.component.provides and not points:
            problems.append(
                (
                    "memory.type",
                    f"memory '{memory.type_as_written}' attaches at {_fmt(memory.component.provides)}, "
                    f"but head '{head.type_as_written}' offers {_fmt(head.component.offers)}",
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


def value_label(v: Any) -> str:
    if isinstance(v, dict):  # a component by its type, a stage by its name
        return str(v.get("type") or v.get("name") or "table")
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def point_recipe(recipe: Recipe, point: dict[str, Any], registry: Registry | None = None) -> Recipe:
    raw = copy.deepcopy(recipe.raw)
    raw.pop("sweep", None)
    try:
        for k, v in point.items():
            apply_override(raw, k, v, what="sweep")
    except RecipeError as exc:
        raise exc.with_file(recipe.file) from None
    try:
        return resolve(raw, registry or load_registry(), recipe.file)
    except RecipeError as exc:
        raise exc.with_file(recipe.file) from None
