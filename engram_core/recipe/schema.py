"""The recipe's tables as attrs classes: run, stages, parameter groups, and the resolved recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from ..config import (
    adam_betas,
    field,
    finite_non_negative,
    finite_positive,
    in_range,
    non_negative,
    one_of,
    positive,
    unstructure,
)
from ..errors import ConfigError, did_you_mean
from ..registry import Component
from ..run.rundir import run_name_problem
from .toml import to_toml

MAX_SWEEP_POINTS = 10_000  # every point is built and checked before the first runs


SECTIONS = ("run", "data", "head", "memory", "stages", "metrics", "sweep", "select")


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


def _graphs_mode(inst, attribute, value):
    if not (isinstance(value, bool) or value == "auto"):
        hint = " (did you mean 'auto'?)" if isinstance(value, str) and value.strip().lower() == "auto" else ""
        raise ConfigError(attribute.name, f"must be true, false or 'auto', got {value!r}{hint}")


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
    matmul_precision: str = field(
        "highest", help="float32 matmuls on CUDA (torch.set_float32_matmul_precision): 'highest' (fp32), 'high' (TF32) or 'medium' (bf16)",
        validator=one_of("highest", "high", "medium"))
    compile: bool = field(False, help="torch.compile the training forward (objective, head, memory); evaluation stays eager")
    cuda_graphs: bool | str = field(
        False, help="replay each training step as one CUDA graph after 3 eager steps (CUDA, one process); 'auto': in the "
                    "stages that allow it, eager in the others and off CUDA", validator=_graphs_mode)
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
class StopAtConfig:
    """End a train stage early once an evaluation reaches a threshold (Lightning's
    EarlyStopping `stopping_threshold`; Zoology stops at validation accuracy 0.99)."""

    metric: str = field(help="a metric of the stage's evaluations, as summary.json names it (eval/acc)")
    threshold: float = field(help="stop at the first evaluation where the metric reaches this")
    mode: str = field("max", help="'max': stop when metric >= threshold; 'min': when metric <= threshold", validator=one_of("max", "min"))


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
    optimizer_impl: str = field(
        "auto", help="how adamw/adam/sgd run: 'auto' (torch's choice), 'fused' (one kernel), 'foreach' or 'for-loop'",
        validator=one_of("auto", "fused", "foreach", "for-loop"))
    lr: float = field(1e-3, help="peak learning rate (finite, > 0, <= 1e30)", validator=learning_rate)
    weight_decay: float = field(0.0, help="weight decay (finite, >= 0, <= 1e6)", validator=decay_rate)
    betas: tuple[float, float] = field((0.9, 0.999), help="Adam betas: two values in [0, 1)", validator=adam_betas)
    momentum: float = field(0.0, help="SGD momentum, in [0, 1]", validator=in_range(0.0, 1.0))
    schedule: str = field("constant", help="'constant', 'cosine' or 'linear'", validator=one_of("constant", "cosine", "linear"))
    warmup_steps: int = field(0, help="linear warm-up steps", validator=non_negative)
    min_lr_ratio: float = field(0.0, help="lr at the end of a decay, as a fraction of lr", validator=in_range(0.0, 1.0))
    grad_clip: float = field(0.0, help="max global gradient norm; 0 = off", validator=finite_non_negative)
    eval_every: int = field(0, help="steps between evaluations; 0 = only at the stage's end", validator=non_negative)
    stop_at: StopAtConfig | None = field(None, help="{ metric = \"eval/acc\", threshold = 0.99 }: end the stage at the first evaluation "
                                               "(every eval_every steps, on eval_split) that reaches the threshold")
    checkpoint_every: int = field(0, help="steps between checkpoints; 0 = at the stage's end", validator=non_negative)
    log_every: int = field(10, help="steps between train/* scalars", validator=positive)
    train: tuple[str, ...] = field(("*",), help="glob patterns of parameters that train")
    freeze: tuple[str, ...] = field((), help="glob patterns of parameters frozen even if `train` matches")
    param_groups: tuple[ParamGroupConfig, ...] = field((), help="per-group lr / weight decay / optimizer")
    memory: bool = field(True, help="whether the memory is active during this stage")
    split: str = field("train", help="split the objective samples from")
    eval_split: str = field("eval", help="split the metrics run on")
    metrics: tuple[str, ...] | None = field(None, help="metric types to run (default: all)")

    def __attrs_post_init__(self):
        if self.stop_at is not None and not self.eval_every:
            raise ConfigError("stop_at", "needs evaluations during the stage to stop at: set eval_every (steps between them) > 0")


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


@attrs.frozen
class SelectConfig:
    """`[select]`: after the `[sweep]` grid, choose its best point by a metric (measured on a
    validation split), then run that point again with each combination of `then`."""

    metric: str = field(help="a final metric of every point, as summary.json names it ('<stage>:<tag>' for an earlier "
                             "stage's, e.g. 'val:eval/acc'); measure it on a validation split, report on another")
    mode: str = field("max", help="'max' or 'min': which value wins", validator=one_of("max", "min"))
    then: dict = field(factory=dict, help="dotted paths to lists, e.g. { \"run.seed\" = [1, 2] }: the chosen point run again "
                                          "with each combination (keys the grid does not sweep)")


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
    origins: Any = None  # engram_core.recipe.extends.Origins: the file (or override) of each value in raw
    select: SelectConfig | None = None  # [select]: choose the sweep's best point, then re-run it

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
        if include_sweep and self.select is not None:
            out["select"] = unstructure(self.select)
        return out

    def to_toml(self, include_sweep: bool = True) -> str:
        return to_toml(self.to_dict(include_sweep))
