"""`engram validate` and `engram-run --dry-run`: build every component without training.

A recipe that passes here fails before step 1 only for reasons no check can know
(disk full, a bug that shows at step 900). What is checked, every problem at once:

- the device (`cuda` without CUDA, with the file named);
- the data set: its `dry_spec(config, build)` where it offers one (the spec from the
  settings alone: no data generated), else it is built (generated data sets are
  cached, so the run that follows reuses what validate made);
- head, memory, every objective (and every term of a composite such as
  `weighted_sum`) and every metric, built on the `meta` device: shapes and the
  factories' own checks, no memory allocated, no weights loaded (`build.dry_run`
  tells a factory that loads weights to build from the config alone);
- stage splits and eval splits against the data set's splits, fit actions and their
  options against the target's methods, and every `train`, `freeze` and
  `param_groups` pattern against the assembled model's parameter names.

An exception that escapes a component's factory becomes one line naming the component
and its recipe key (`ComponentError`); `--traceback` shows the stack.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import traceback
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from ..components import BuildContext, Model
from ..config import ConfigProblems
from ..errors import ConfigError, EngramError, RecipeError, did_you_mean
from ..recipe import FitStage, Recipe, Resolved, TrainStage
from ..registry import load_registry

META = torch.device("meta")


class ComponentError(EngramError):
    """An exception that escaped a component: one line with the component and its recipe key.

    `original` keeps the exception (and its traceback) for ``--traceback``.
    """

    def __init__(self, line: str, original: BaseException, exit_code: int = 1):
        super().__init__(line)
        self.original = original
        self.exit_code = exit_code

    def stack(self) -> str:
        return "".join(traceback.format_exception(self.original))


def describe(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


@contextlib.contextmanager
def blame(what: str, file: str | None = None, exit_code: int = 1) -> Iterator[None]:
    """Turn an exception escaping a component into a one-line `ComponentError`.

    `what` names the component and its recipe key: "objective 'gaussian_nll' (stages.0.objective)".
    Errors the user can already read (EngramError), Ctrl-C and exits pass through.
    """
    try:
        yield
    except (EngramError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception as exc:
        where = f"{file}: " if file else ""
        inner = raised_in(exc)
        if inner is not None and not what.startswith(inner):  # the memory a head called, not the objective that called it
            raise ComponentError(f"{where}{inner} raised {describe(exc)} (called from {what})", exc, exit_code) from exc
        raise ComponentError(f"{where}{what} raised {describe(exc)}", exc, exit_code) from exc


# every component make_component built, by identity -> its label ("memory 'x' (memory)")
_LABELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _remember(component: Any, label: str) -> None:
    try:
        _LABELS[component] = label
    except TypeError:  # not weak-referenceable or not hashable: named by its caller instead
        pass


def raised_in(exc: BaseException) -> str | None:
    """The label of the innermost built component whose method the exception passed
    through (the frames' `self`), or None. An objective calls the model, the head calls
    the memory: the memory's own error names the memory and its recipe key."""
    found = None
    tb = exc.__traceback__
    while tb is not None:  # outermost to innermost
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None:
            try:
                label = _LABELS.get(owner)
            except TypeError:
                label = None
            found = label or found
        tb = tb.tb_next
    return found


def component_label(resolved: Resolved) -> str:
    kind = {"datasets": "data set", "heads": "head", "memories": "memory", "objectives": "objective", "metrics": "metric"}
    return f"{kind.get(resolved.component.kind, resolved.component.kind)} '{resolved.type_as_written}' ({resolved.path})"


def make_component(resolved: Resolved, build: BuildContext, file: str, exit_code: int = 2) -> Any:
    """`factory(config, build)`; config problems name the recipe key, anything else the component."""
    try:
        with blame(component_label(resolved), file, exit_code):
            component = resolved.component.factory(resolved.config, build)
        _remember(component, component_label(resolved))
        return component
    except ConfigProblems as exc:
        raise RecipeError([(_join(resolved.path, p), m) for p, m in exc.problems], file) from None
    except ConfigError as exc:
        raise RecipeError([(_join(resolved.path, exc.key), exc.message)], file) from None


def _join(path: str, key: str | None) -> str:
    return f"{path}.{key}" if key else path


def check_device(name: str) -> list[tuple[str, str]]:
    if name.startswith("cuda") and not torch.cuda.is_available():
        return [("run.device", f"'{name}' asked for, but CUDA is not available on this machine; use 'auto' (CUDA where present) or 'cpu'")]
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        return [("run.device", f"'{name}' asked for, but this machine has {torch.cuda.device_count()} CUDA device(s) (0-based)")]
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return [("run.device", "'mps' asked for, but MPS is not available on this machine; use 'auto' or 'cpu'")]
    return []


# ---- checks shared with the engine's real build -----------------------------------------------


def stage_problems(recipe: Recipe, splits, targets: dict[str, Any]) -> list[tuple[str, str]]:
    """Splits, eval splits and fit actions of every stage."""
    problems = []
    for i, st in enumerate(recipe.stages):
        if hasattr(st, "split") and st.split not in splits:
            problems.append((f"stages.{i}.split", f"data set has no split {st.split!r}{did_you_mean(st.split, splits)}; splits: {', '.join(splits)}"))
        if isinstance(st, TrainStage) and st.eval_split not in splits:
            problems.append((f"stages.{i}.eval_split", f"data set has no split {st.eval_split!r}{did_you_mean(st.eval_split, splits)}; splits: {', '.join(splits)}"))
        if isinstance(st, FitStage) and targets.get(st.target) is not None:
            problems.extend(fit_problems(targets[st.target], st, i))
    return problems


def fit_problems(target: Any, stage: FitStage, index: int) -> list[tuple[str, str]]:
    """The fit action is a method of the target and accepts the stage's options."""
    path = f"stages.{index}"
    fn = getattr(target, stage.action, None)
    if fn is None or not callable(fn) or stage.action.startswith("_"):
        actions = fit_actions(target)
        return [(f"{path}.action", f"{stage.target} ({type(target).__name__}) has no action '{stage.action}'"
                 f"{did_you_mean(stage.action, actions)}; actions: {', '.join(actions) or 'none'}")]
    params = list(inspect.signature(fn).parameters.values())[1:]  # after ctx
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    names = [p.name for p in params]
    return [
        (f"{path}.options.{key}", f"unknown option of {type(target).__name__}.{stage.action}{did_you_mean(key, names)}; options: {', '.join(names) or 'none'}")
        for key in stage.options if key not in names
    ]


def fit_actions(target: Any) -> list[str]:
    """Public methods of a fit target whose first parameter is the fit context."""
    out = []
    for name in dir(type(target)):
        if name.startswith("_") or name in dir(torch.nn.Module):
            continue
        fn = getattr(target, name, None)
        if not callable(fn) or inspect.isclass(fn):
            continue
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if params and params[0] == "ctx":
            out.append(name)
    return out


def parameter_problems(recipe: Recipe, named: dict[int, list[str]]) -> list[tuple[str, str]]:
    """Every train / freeze / param_groups pattern of every train stage matches a parameter.

    `named[i]` lists the parameter names stage i can train (model and its objective).
    """
    problems = []
    for i, st in enumerate(recipe.stages):
        if not isinstance(st, TrainStage):
            continue
        names = named.get(i, [])
        sample = ", ".join(names[:4]) + ("..." if len(names) > 4 else "")

        def unmatched(pattern: str, names: list[str] = names) -> bool:  # bound now: this stage's names
            return not any(fnmatch.fnmatchcase(n, pattern) for n in names)

        for j, pat in enumerate(st.train):
            if unmatched(pat):
                problems.append((f"stages.{i}.train.{j}", f"pattern {pat!r} matches no parameter; names look like: {sample}"))
        for j, pat in enumerate(st.freeze):
            if unmatched(pat):
                problems.append((f"stages.{i}.freeze.{j}", f"pattern {pat!r} matches no parameter; names look like: {sample}"))
        for g, group in enumerate(st.param_groups):
            for j, pat in enumerate(group.params):
                if unmatched(pat):
                    problems.append((f"stages.{i}.param_groups.{g}.params.{j}", f"pattern {pat!r} matches no parameter; names look like: {sample}"))
        trains = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in st.train) and not any(fnmatch.fnmatchcase(n, p) for p in st.freeze)]
        if names and not trains and not any(p.startswith(f"stages.{i}.") for p, _ in problems):
            problems.append((f"stages.{i}.train", "no parameter trains in this stage (every match of `train` is frozen by `freeze`)"))
    return problems


# ---- the dry build -----------------------------------------------------------------------------


class DryBuild:
    """The components of a recipe as built by `check_recipe` (meta device; data spec only where offered)."""

    dataset: Any = None
    spec: Any = None
    splits: tuple[str, ...] = ()
    head: Any = None
    memory: Any = None
    model: Model | None = None
    objectives: dict[int, Any]
    metrics: list[Any]

    def __init__(self) -> None:
        self.objectives = {}
        self.metrics = []


def check_recipe(recipe: Recipe, device: str | None = None) -> DryBuild:
    """Build `recipe` without training; raise RecipeError listing every problem found."""
    file = recipe.file
    problems: list[tuple[str, str]] = []
    out = DryBuild()
    problems += check_device(device or recipe.run.device)

    def attempt(fn, *args):
        try:
            return fn(*args)
        except RecipeError as exc:
            problems.extend(exc.problems)
        return None

    seed = recipe.run.seed
    base = dict(seed=seed, device=META, dry_run=True, registry=load_registry())
    # the data set: its spec from the settings alone where it can, else built (cached) on the CPU
    data = recipe.data
    dry_spec = getattr(data.component.factory, "dry_spec", None)
    if dry_spec is not None:
        spec = attempt(_dry_spec, data, dry_spec, BuildContext(seed=seed, dry_run=True), file)
        if spec is not None:
            out.spec = spec
            # a spec may say which splits these settings give (mqar's val exists only with n_val)
            out.splits = tuple(spec.get("splits") or getattr(data.component.factory, "splits", ("train", "eval")))
    else:
        ds = attempt(make_component, data, BuildContext(seed=seed, dry_run=True), file)
        if ds is not None:
            out.dataset, out.spec, out.splits = ds, ds.spec, tuple(ds.splits)
    if out.spec is None:  # nothing downstream can be built without the data's spec
        raise RecipeError(problems, file)

    torch.manual_seed(seed)
    with torch.device(META):
        out.head = attempt(make_component, recipe.head, BuildContext(spec=out.spec, dataset=out.dataset, **base), file)
        if out.head is not None and recipe.memory is not None:
            mb = BuildContext(spec=out.spec, dataset=out.dataset, head=out.head, **base)
            out.memory = attempt(make_component, recipe.memory, mb, file)
        if out.head is not None:
            points = [p for p in recipe.memory.component.points if p in recipe.head.component.points] if recipe.memory else []
            try:
                with blame(f"head '{recipe.head.type_as_written}' (head) attaching memory", file, 2):
                    out.model = Model(out.head, out.memory, points[0] if points else None)
            except EngramError as exc:
                problems.append(("memory", str(exc).split(": ", 1)[-1]))
        ob = BuildContext(spec=out.spec, dataset=out.dataset, head=out.head, **base)
        for i, o in recipe.objectives.items():
            built = attempt(make_component, o, ob, file)
            if built is not None:
                out.objectives[i] = built
        for m in recipe.metrics:
            out.metrics.append(attempt(make_component, m, ob, file))

    if out.splits:
        targets = {"head": out.head, "memory": out.memory, "data": out.dataset}
        problems += stage_problems(recipe, out.splits, targets)
    if out.model is not None and (recipe.memory is None or out.memory is not None):
        model_names = [n for n, _ in out.model.named_parameters()]
        named = {}
        for i, st in enumerate(recipe.stages):
            if isinstance(st, TrainStage) and i in recipe.objectives:
                if i not in out.objectives:
                    continue  # its objective failed to build: reported above
                named[i] = model_names + [f"objective.{n}" for n, _ in out.objectives[i].named_parameters()]
        problems += parameter_problems(recipe, named)
    if problems:
        raise RecipeError(problems, file)
    return out


def _dry_spec(data: Resolved, dry_spec, build: BuildContext, file: str):
    try:
        with blame(component_label(data), file, 2):
            return dry_spec(data.config, build)
    except ConfigProblems as exc:
        raise RecipeError([(_join(data.path, p), m) for p, m in exc.problems], file) from None
    except ConfigError as exc:
        raise RecipeError([(_join(data.path, exc.key), exc.message)], file) from None


def check_all(recipe: Recipe, device: str | None = None) -> int:
    """The recipe and, for a sweep, every point: all problems in one RecipeError. Returns the point count."""
    from ..recipe import point_recipe, sweep_points

    if not recipe.sweep:
        check_recipe(recipe, device)
        return 1
    pts = sweep_points(recipe)
    per_point: list[tuple[str, list[tuple[str, str]]]] = []
    for label, point in pts:
        try:
            check_recipe(point_recipe(recipe, point), device)
        except RecipeError as exc:
            per_point.append((label, exc.problems))
    # a problem every point has is the recipe's: said once, not once per point
    common = set.intersection(*(set(p) for _, p in per_point)) if len(per_point) == len(pts) else set()
    problems = [p for p in per_point[0][1] if p in common] if common else []
    for label, found in per_point:
        problems += [(f"sweep point {label}: {p}" if p else f"sweep point {label}", m) for p, m in found if (p, m) not in common]
    if problems:
        raise RecipeError(problems, recipe.file)
    return len(pts)
