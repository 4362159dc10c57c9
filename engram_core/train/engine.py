"""The engine: build a recipe's components, run its stages, evaluate, write the run directory.

The only module that knows all five kinds of component. Read it top to bottom:
`build` → `run` → per stage `_train` / `_fit` / `_eval_stage` → `evaluate` → `summary`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from ..components import BuildContext, EvalContext, Event, FitContext, Model, to_device
from ..errors import ConfigError, EngramError, NonFiniteLossError, RecipeError
from ..optim import row_holder
from ..recipe import EvalStage, FitStage, Recipe, Resolved, TrainStage
from ..registry import Registry, load_registry
from ..run import distributed, threads
from ..run.accel import autocast, check_compilable, compile_failure, grad_scaler, is_compile_failure
from ..run.commands import runnable
from ..run.loggers import open_run_logger
from ..run.metric_info import write_for_run
from ..run.progress import Progress
from ..run.rundir import (
    MetricsLog,
    atomic_write_json,
    atomic_write_text,
    environment,
    load_checkpoint,
    mark_run_dir,
    nonfinite_tensors,
    remove_stale_temporaries,
    save_checkpoint,
)
from ..run.tb import NullLogger, drop_events_after
from ..tables import state as sharded_state
from ..tables.sharded_rows import clip_grad_norm_, serve_peers
from .graphs import CapturedStep, make_capturable
from .meter import StepMeter
from .validate import blame, component_label, describe, make_component, parameter_problems, stage_problems


@attrs.define(eq=False)
class StageRun:
    """What one train stage holds while it runs (built by `Engine._start_stage`)."""

    index: int
    stage: TrainStage
    objective: Any
    who: str  # the objective's label in error messages
    start: int  # the stage step to begin at (> 0 on resume)
    params: list
    held: list  # (name, RowHolder) of tables whose rows live outside their parameter
    opts: list
    scheds: list
    scaler: Any
    forward: Callable  # batch -> (loss, terms): the objective on the model (DDP-wrapped on N ranks, compiled with run.compile)
    no_sync: Callable
    amp: Any  # the autocast context (reusable)
    compiled: bool
    local_size: int
    splits: bool  # micro-batches or rank shards
    meter: StepMeter
    check_every_step: bool  # on the CPU, reading the loss costs nothing: stop at the very step
    count_tokens: Callable | None
    prefetchers: list
    step_hooks: list
    evaluates: bool
    captured: CapturedStep | None = None
    ahead: dict | None = None  # the next step's batch, drawn early and already handed to `prefetch`
    tokens_since: int = 0
    t_log: float = attrs.field(factory=time.perf_counter)

    @property
    def opt_ref(self):
        return self.opts[0] if len(self.opts) == 1 else self.opts


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError([("run.device", f"'{name}' asked for, but CUDA is not available on this machine (use 'auto' or 'cpu')")])
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Engine:
    def __init__(
        self,
        recipe: Recipe,
        run_dir: Path,
        registry: Registry | None = None,
        device: str | None = None,
        show_progress: bool = True,
        console: Any = None,
        hparams: dict | None = None,
    ):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.registry = registry or load_registry()
        self.dist = distributed.current()  # rank 0 of 1 outside torchrun
        try:
            self.device = pick_device(distributed.rank_device(device or recipe.run.device, self.dist))
        except RecipeError as exc:  # name the recipe file, as validate does
            raise exc.with_file(recipe.file) from None
        if not self.dist.is_main:
            from rich.console import Console

            console = Console(quiet=True)  # rank 0 speaks for the run
        self.progress = Progress(console=console, enabled=show_progress and self.dist.is_main)
        self.console = self.progress.console
        self.hparams = hparams or {}
        self.step = 0  # global optimiser steps over all stages
        self.stage_results: dict[str, dict[str, float]] = {}
        self.status = "created"  # running, completed, failed, nonfinite, interrupted
        self.error: str | None = None
        self.t0 = time.time()
        self.prior_wall = 0.0  # wall time of the run before a resume
        self.metrics_log: MetricsLog | None = None
        self.logger: Any = NullLogger()
        self.sampler = torch.Generator().manual_seed(recipe.run.seed)  # draws every training batch
        self._sampler_before_ahead: torch.Tensor | None = None  # the sampler before a prefetch's early draw
        self._compile_checked = False  # the first compiled step has run (compile failures are reported then)

    # ---- build ------------------------------------------------------------------------

    def _make(self, resolved: Resolved, build: BuildContext) -> Any:
        return make_component(resolved, build, self.recipe.file)

    def build(self) -> None:
        r = self.recipe
        seed_everything(r.run.seed)
        base = dict(seed=r.run.seed, device=self.device, run_dir=self.run_dir, registry=self.registry)
        self.dataset = self._make(r.data, BuildContext(**base))
        spec = self.dataset.spec
        bc = BuildContext(spec=spec, dataset=self.dataset, **base)
        self.head = self._make(r.head, bc)
        self.memory = None
        point = None
        if r.memory is not None:
            self.memory = self._make(r.memory, BuildContext(spec=spec, dataset=self.dataset, head=self.head, **base))
            points = [p for p in r.memory.component.provides if p in r.head.component.offers]
            point = points[0] if points else None
        self.model = Model(self.head, self.memory, point).to(self.device)
        place = getattr(self.dataset, "place", None)
        if callable(place):  # a data set that can keep its tensors on the run's device samples there
            place(self.device)
        if r.run.compile:
            check_compilable(self._compiled())
        ob = BuildContext(spec=spec, dataset=self.dataset, head=self.head, **base)
        self.objectives = {i: self._make(o, ob).to(self.device) for i, o in r.objectives.items()}
        self.metrics = [self._make(m, ob) for m in r.metrics]
        self.metric_types = [(m.component.name, m.type_as_written) for m in r.metrics]
        self.labels = {"objectives": {i: component_label(o) for i, o in r.objectives.items()},
                       "metrics": [component_label(m) for m in r.metrics]}
        # the same checks as `engram validate` (engram_core.train.validate), on the real components
        targets = {"head": self.head, "memory": self.memory, "data": self.dataset}
        problems = stage_problems(r, tuple(self.dataset.splits), targets)
        names = [n for n, _ in self.model.named_parameters()]
        problems += parameter_problems(r, {i: names + [f"objective.{n}" for n, _ in o.named_parameters()] for i, o in self.objectives.items()})
        problems += self._held_row_problems()
        if problems:  # unmatched patterns, unknown splits and actions fail now, not mid-run
            raise RecipeError(problems, r.file)
        for i, st in enumerate(r.stages):
            if isinstance(st, TrainStage):
                distributed.check_batch_split(st.batch_size, self.dist.world_size, st.grad_accum, f"stages.{i}", r.file)

    def _compiled(self) -> dict:
        return {"head": self.head, "memory": self.memory}

    def _fit_target(self, st: FitStage) -> Any:
        return {"head": self.head, "memory": self.memory, "data": self.dataset}[st.target]

    def _components(self, objective=None) -> list[Any]:
        items = [self.dataset, self.head, self.memory, objective, *self.metrics]
        return [c for c in items if c is not None]

    def _emit(self, hook: str, event: Event, objective=None) -> None:
        for comp in self._components(objective):
            fn = getattr(comp, hook, None)
            if fn is not None:
                with blame(f"{self._label_of(comp)}.{hook}", self.recipe.file):
                    fn(event)

    def _label_of(self, comp: Any) -> str:
        r = self.recipe
        pairs = [(self.dataset, r.data), (self.head, r.head), (self.memory, r.memory)]
        pairs += [(self.objectives[i], o) for i, o in r.objectives.items()] + list(zip(self.metrics, r.metrics))
        return next((component_label(res) for c, res in pairs if c is comp and res is not None), type(comp).__name__)

    # ---- run --------------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict:
        r = self.recipe
        self.t0 = time.time()
        state = load_checkpoint(self.run_dir) if resume else None
        main = self.dist.is_main  # rank 0 writes the run directory; the others only read it
        self.metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", readonly=not main)
        if state is None:
            self.metrics_log.truncate(0)
        else:
            self.metrics_log.truncate(state["n_records"])
            self._restore_common(state)
            for rec in self.metrics_log.records:
                if rec.get("stage_end"):
                    self.stage_results[rec["stage"]] = rec["metrics"]
        env = environment(self.registry, self.device)
        env["distributed"] = self._distributed_env()  # a collective: every rank takes part
        if main:  # the engine's folder (engram-run made it already; Python callers may not have)
            mark_run_dir(self.run_dir)
            write_for_run(self.run_dir, self.metrics, r.to_dict(include_sweep=False))  # directions, groups, chance lines
            if not resume:
                remove_stale_temporaries(self.run_dir)
        if not resume and main:
            atomic_write_text(self.run_dir / "recipe.toml", r.to_toml(include_sweep=False))
        if main:
            atomic_write_json(self.run_dir / "env.json", env)
            if state is not None:  # what the checkpoint does not know (a killed eval's scalars) is dropped
                drop_events_after(self.run_dir, state.get("saved_at"))
            self.logger = open_run_logger(self.run_dir, (self.step + 1) if state is not None else None, r, self.registry, resumed=state is not None)
        else:
            self.logger = NullLogger()  # rank 0 logs (TensorBoard and trackers) for the run
        start_stage = 0
        if state is not None:
            start_stage = state["stage_index"] + (1 if state["stage_done"] else 0)
        self.status = "running"
        try:
            for i in range(start_stage, len(r.stages)):
                st = r.stages[i]
                mid = state if (state is not None and state["stage_index"] == i and not state["stage_done"]) else None
                if isinstance(st, TrainStage):
                    self._train(i, st, mid)
                elif isinstance(st, FitStage):
                    self._fit(i, st)
                else:
                    self._eval_stage(i, st)
            self.status = "completed"
        except NonFiniteLossError as exc:
            self.status, self.error = "nonfinite", str(exc)
            raise
        except KeyboardInterrupt:
            self.status, self.error = "interrupted", "interrupted (Ctrl-C or SIGINT)"
            raise
        except BaseException as exc:  # a failed run says so, with its one-line error
            self.status, self.error = "failed", str(exc).splitlines()[0] if isinstance(exc, EngramError) else describe(exc)
            raise
        finally:
            self.progress.stop()
            summary = self.summary()
            if main:
                atomic_write_json(self.run_dir / "summary.json", summary)
            self.logger.summary(summary, self.status)  # the trackers' (TensorBoard's is below)
            self.logger.layout(self.logger.tags | {k for rec in self.metrics_log.records for k in rec["metrics"]})
            # hparams of every run, finished or not, so a sweep's HParams tab shows failed points too
            self.logger.hparams(self.hparams or self._default_hparams(), summary["final"])
            self.logger.close()
        return summary

    def _distributed_env(self) -> dict:
        """World size, backend and every rank's device (for env.json)."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        devices = self.dist.all_gather_object({"rank": self.dist.rank, "device": str(self.device), "device_name": name})
        return {
            "world_size": self.dist.world_size,
            "backend": distributed.backend_for(self.device) if self.dist.enabled else None,
            "process_group": self.dist.backend,
            "devices": devices,
        }

    def _default_hparams(self) -> dict:
        r = self.recipe
        hp = {"data.type": r.data.type_as_written, "head.type": r.head.type_as_written, "run.seed": r.run.seed}
        hp["memory.type"] = r.memory.type_as_written if r.memory else "none"
        return hp

    # ---- train ------------------------------------------------------------------------

    def _select_params(self, st: TrainStage, index: int) -> list[tuple[str, torch.nn.Parameter]]:
        named = [(n, p) for n, p in self.model.named_parameters()]
        if index in self.objectives:
            named += [(f"objective.{n}", p) for n, p in self.objectives[index].named_parameters()]
        # every pattern was checked against these names when the engine was built
        chosen = []
        for n, p in named:
            on = any(fnmatch.fnmatchcase(n, pat) for pat in st.train) and not any(fnmatch.fnmatchcase(n, pat) for pat in st.freeze)
            p.requires_grad_(on)
            if on:
                chosen.append((n, p))
        if not chosen:
            raise RecipeError([(f"stages.{index}.train", "no parameter trains in this stage (check train/freeze patterns)")], self.recipe.file)
        return chosen

    def _held_row_problems(self) -> list[tuple[str, str]]:
        """Tables whose rows live outside their parameter (memory.placement) can only be
        trained by an optimiser registered with `holds_rows`: said before any stage runs."""
        held = [n for n, p in self.model.named_parameters() if row_holder(p) is not None]
        if not held:
            return []
        if self.dist.enabled:
            return [("memory.placement", f"{held[0]} keeps its rows in this process's host memory, which {self.dist.world_size} ranks "
                     "would each update apart: run it in one process, or use a placement made for several ranks ('sharded')")]
        known = self.registry.extensions["optimizers"]
        problems = []
        for i, st in enumerate(self.recipe.stages):
            if not isinstance(st, TrainStage):
                continue
            for n in held:
                if not any(fnmatch.fnmatchcase(n, pat) for pat in st.train) or any(fnmatch.fnmatchcase(n, pat) for pat in st.freeze):
                    continue
                group = next((g for g in st.param_groups if any(fnmatch.fnmatchcase(n, pat) for pat in g.params)), None)
                kind = (group.optimizer if group is not None else None) or st.optimizer
                if not known[kind].holds_rows:
                    where = f"stages.{i}.param_groups.{st.param_groups.index(group)}.optimizer" if group is not None else f"stages.{i}.param_groups"
                    fix = "set it to \"rowwise_adam\" or \"rowwise_adagrad\"" if group is not None else (
                        f"add {{ params = [\"{n}\"], optimizer = \"rowwise_adam\" }} (or \"rowwise_adagrad\")")
                    problems.append((where, f"{n} is a table whose rows live outside the model's parameters (memory.placement), "
                                            f"which {kind!r} cannot update: {fix}, or freeze it"))
                    break
        return problems

    def _optimizers(self, st: TrainStage, chosen) -> list[torch.optim.Optimizer]:
        groups: dict[str, list[dict]] = {}
        default = {"params": [], "lr": st.lr, "weight_decay": st.weight_decay}
        custom = [
            {"params": [], "lr": g.lr or st.lr, "weight_decay": st.weight_decay if g.weight_decay is None else g.weight_decay, "_opt": g.optimizer or st.optimizer, "_pats": g.params}
            for g in st.param_groups
        ]
        for n, p in chosen:
            for g in custom:
                if any(fnmatch.fnmatchcase(n, pat) for pat in g["_pats"]):
                    g["params"].append(p)
                    break
            else:
                default["params"].append(p)
        default["_opt"] = st.optimizer
        for g in [default, *custom]:
            if g["params"]:
                groups.setdefault(g.pop("_opt"), []).append({k: v for k, v in g.items() if k != "_pats"})
        # the recipe's names were checked against the registered optimisers when it loaded
        known = self.registry.extensions["optimizers"]
        return [known[kind].factory(pgs, st) for kind, pgs in groups.items()]

    @staticmethod
    def _lr_factor(st: TrainStage):
        def factor(step: int) -> float:
            if st.warmup_steps and step < st.warmup_steps:
                return (step + 1) / st.warmup_steps
            if st.schedule == "constant":
                return 1.0
            span = max(1, st.steps - st.warmup_steps)
            t = min(1.0, (step - st.warmup_steps) / span)
            if st.schedule == "cosine":
                return st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
            return st.min_lr_ratio + (1 - st.min_lr_ratio) * (1 - t)

        return factor

    # ---- train: the loop, one step, forward/backward, optimiser step --------------------
    #
    # `_train` is the stage's loop; `train_step` one optimiser step; `forward_backward_step`
    # one micro-batch. Nothing in the steady state reads a device value on the host: loss
    # and terms stay in `StageRun.meter` (engram_core.train.meter) until a log step, and the loss
    # is checked for NaN/inf there, before every evaluation and checkpoint, and at the
    # stage's end (every step on the CPU, where reading it costs nothing).

    def _train(self, index: int, st: TrainStage, state: dict | None) -> None:
        run = self._start_stage(index, st, state)
        self.progress.start(st.name, st.steps, run.start)
        for s in range(run.start, st.steps):
            batch = self._next_batch(run, s)
            log_now = (s + 1) % st.log_every == 0 or s + 1 == st.steps
            lr_now = self._current_lr(run) if log_now else None  # the rate this step is taken with
            self.train_step(run, batch)
            self.step += 1
            done = s + 1
            if run.check_every_step:
                self._check_finite(run)
            if log_now:
                self._log_train(run, done, lr_now)
            self._step_hooks(run, done)
            if run.evaluates and st.eval_every and done % st.eval_every == 0 and done != st.steps:
                self._check_finite(run)
                self.evaluate(st.name, st.eval_split, st.batch_size, st.metrics, run.objective, run.opt_ref, stage_end=False)
            if st.checkpoint_every and done % st.checkpoint_every == 0 and done != st.steps:
                self._check_finite(run)
                self._checkpoint(index, done, False, run.opts, run.scheds, run.scaler)
        self._check_finite(run)
        self.progress.finish()
        if run.evaluates:
            self.evaluate(st.name, st.eval_split, st.batch_size, st.metrics, run.objective, run.opt_ref, stage_end=True)
        self._emit("on_stage_end", Event(self.step, st.name, self.model, self.stage_results.get(st.name, {}), self.logger, run.opt_ref,
                                         self.run_dir, st.steps, st.steps), run.objective)
        self._set_memory(True)
        self._checkpoint(index, st.steps, True, [], [])

    def train_step(self, run: StageRun, batch: dict) -> None:
        """One optimiser step on the global batch: eagerly, or as a replay of its CUDA graph."""
        if run.captured is not None:
            run.captured(to_device(batch, self.device))
        else:
            self._whole_step(run, batch)
        run.meter.count_step()
        for sc in run.scheds:
            sc.step()

    def _whole_step(self, run: StageRun, batch: dict) -> dict:
        """Forward and backward of every micro-batch, then the optimiser step; what a CUDA
        graph records. Returns the step's loss and terms (device tensors)."""
        st = run.stage
        for o in run.opts:
            o.zero_grad(set_to_none=True)
        pieces = distributed.micro_batches(self.dist.shard(batch, st.batch_size), run.local_size, st.grad_accum) if run.splits else (batch,)
        loss_sum, terms_sum = None, {}
        for k, piece in enumerate(pieces):
            last = k == st.grad_accum - 1
            loss, terms = self.forward_backward_step(run, to_device(piece, self.device), sync_grads=last)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            for key, v in terms.items():
                terms_sum[key] = terms_sum[key] + v if key in terms_sum else v
        if self.dist.enabled:  # the global mean loss: every rank sees it, so all stop together on NaN
            loss_sum = self.dist.all_reduce_mean(loss_sum.float().reshape(1)).reshape(())
        self._optimizer_step(run)
        run.meter.add(loss_sum, terms_sum)
        return {"loss": loss_sum, **terms_sum}

    def forward_backward_step(self, run: StageRun, piece: dict, sync_grads: bool = True) -> tuple[torch.Tensor, dict]:
        """The objective's forward and the backward of one micro-batch (DDP all-reduces
        gradients on the last one only). Returns its share of the loss and terms, detached."""
        accum = run.stage.grad_accum
        with run.no_sync() if not sync_grads else contextlib.nullcontext():
            try:
                with run.amp, blame(run.who, self.recipe.file):
                    loss, terms = run.forward(piece)
            except Exception as exc:
                cause = getattr(exc, "original", exc)  # blame() wraps what the component raised
                if run.compiled and not self._compile_checked and is_compile_failure(cause):
                    raise compile_failure(cause, self._compiled()) from None
                raise
            self._compile_checked = True
            part = loss / accum if accum > 1 else loss
            (run.scaler.scale(part) if run.scaler is not None else part).backward()
        shares = {}
        for key, v in terms.items():
            if key != "loss":
                v = v.detach() if isinstance(v, torch.Tensor) else float(v)
                shares[key] = v / accum if accum > 1 else v
        return part.detach(), shares

    def _optimizer_step(self, run: StageRun) -> None:
        """Unscale (fp16), clip, step every optimiser. No host synchronisation."""
        st = run.stage
        if run.scaler is not None:
            for o in run.opts:
                run.scaler.unscale_(o)
        if st.grad_clip > 0:
            dense = [p for p in run.params if p.grad is not None and not p.grad.is_sparse]
            for _, holder in run.held:  # rows held outside their parameter keep their gradients in device buffers
                dense += holder.gradient_leaves()
            clip_grad_norm_(dense, st.grad_clip, self.model)  # row-sharded tables: the norm over all ranks' rows
        for o in run.opts:
            if run.scaler is not None:
                run.scaler.step(o)
            else:
                o.step()
        if run.scaler is not None:
            run.scaler.update()

    # ---- train: the stage's set-up, batches, logging, checks ---------------------------

    def _start_stage(self, index: int, st: TrainStage, state: dict | None) -> StageRun:
        """Parameters, optimisers, schedules and the step function of a train stage; on
        resume, their state from the checkpoint."""
        objective = self.objectives[index]
        chosen = self._select_params(st, index)
        held = [(n, row_holder(p)) for n, p in chosen if row_holder(p) is not None]
        for _, holder in held:
            holder.claim(None)  # this stage's optimisers claim them again
        opts = self._optimizers(st, chosen)
        unclaimed = [n for n, holder in held if getattr(holder, "optimizer", None) is None]
        if unclaimed:  # rows kept outside the parameter (memory.placement) that no optimiser here could update
            raise RecipeError([(f"stages.{index}.param_groups", f"{unclaimed[0]} is a table whose rows live outside the model's parameters (its placement) and only a "
                                f"row-wise optimiser trains it: add {{ params = [\"{unclaimed[0]}\"], optimizer = \"rowwise_adam\" }} (or \"rowwise_adagrad\"), "
                                f"or freeze it")], self.recipe.file)
        graphs = self.recipe.run.cuda_graphs
        if graphs:
            self._check_graphable(index, st, held)
            make_capturable(opts, self.device, f"stages.{index}")
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, self._lr_factor(st)) for o in opts]
        scaler = grad_scaler(self.recipe.run.precision, self.device)
        start = self._restore_stage(state, opts, scheds, scaler) if state is not None else 0
        self._set_memory(st.memory)
        self.model.train()
        objective.train()
        # one process: objective(model, batch); N ranks: the same under DDP
        forward, no_sync = distributed.wrap_train_step(self.model, objective, self._components(objective), self.dist, self.device)
        if self.recipe.run.compile:
            forward = torch.compile(forward)  # the whole forward and loss; backward through AOTAutograd
        run = StageRun(
            index=index, stage=st, objective=objective, who=self.labels["objectives"][index], start=start,
            params=[p for _, p in chosen], held=held, opts=opts, scheds=scheds, scaler=scaler, forward=forward, no_sync=no_sync,
            amp=autocast(self.recipe.run.precision, self.device, cache=not graphs), compiled=self.recipe.run.compile,
            local_size=st.batch_size // self.dist.world_size, splits=self.dist.enabled or st.grad_accum > 1,
            meter=StepMeter(self.device, first_step=start), check_every_step=self.device.type != "cuda",
            count_tokens=getattr(self.dataset, "count_tokens", None), prefetchers=self._prefetchers(objective),
            step_hooks=[c.on_step_end for c in self._components(objective) if hasattr(c, "on_step_end")],
            evaluates=bool(self.metrics) and st.metrics != (),  # `metrics = []`: this stage does not evaluate
        )
        if graphs:
            run.captured = CapturedStep(lambda batch: self._whole_step(run, batch), f"stages.{index} ({st.name})")
        return run

    def _restore_stage(self, state: dict, opts, scheds, scaler) -> int:
        """Optimiser, schedule, scaler and sampler state of a stage stopped mid-way; returns
        the step to continue from."""
        # the recipe's hyperparameters win over the checkpoint's: `--resume RUN_DIR stages.0.lr=...`
        recipe_groups = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] for o in opts]
        for o, s in zip(opts, state["optimizers"]):
            o.load_state_dict(s)
        sharded_state.load_optimizers(self.run_dir, state.get("sharded_tables"), opts, self.model)  # rows this rank owns
        for sc, s in zip(scheds, state["schedulers"]):
            sc.load_state_dict(s)
        for o, sc, groups in zip(opts, scheds, recipe_groups):
            for g, fresh in zip(o.param_groups, groups):
                # only what the recipe changed: the rate keeps its schedule factor and any
                # scaling a component applied (deq-hrr's warm restarts), so plain resume is exact
                if fresh["initial_lr"] != g["initial_lr"]:
                    g["lr"] = g["lr"] * fresh["initial_lr"] / g["initial_lr"]
                for k, v in fresh.items():
                    if k != "lr" and g.get(k) != v:
                        g[k] = v
            sc.base_lrs = [g["initial_lr"] for g in o.param_groups]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self._restore_rng(state)
        return state["stage_step"]

    def _check_graphable(self, index: int, st: TrainStage, held) -> None:
        """What `run.cuda_graphs` cannot capture, said before the stage starts."""
        why = None
        if self.device.type != "cuda":
            why = f"needs CUDA (this run is on {self.device})"
        elif self.dist.enabled:
            why = f"runs in one process (this run has {self.dist.world_size} ranks)"
        elif st.grad_accum > 1:
            why = f"needs grad_accum = 1 (stages.{index}.grad_accum = {st.grad_accum})"
        elif self.recipe.run.precision == "fp16":
            why = "cannot capture fp16 loss scaling (use run.precision = \"bf16\")"
        elif held or self._prefetchers(self.objectives[index]):
            why = "cannot capture tables whose rows are fetched between steps (memory.placement)"
        if why:
            raise RecipeError([("run.cuda_graphs", f"{why}; set run.cuda_graphs = false")], self.recipe.file)

    def _next_batch(self, run: StageRun, s: int) -> dict:
        """The step's global batch. With prefetching components, the next step's batch is
        drawn one step early and handed to `prefetch`, so its rows move while this step runs;
        a checkpoint saves the sampler as it was before that draw, so resume draws it again."""
        st = run.stage
        if run.ahead is not None:
            batch, run.ahead = run.ahead, None
        else:
            batch = self._sample(run)
            self._prefetch(run.prefetchers, batch)
        self._sampler_before_ahead = None
        if run.prefetchers and s + 1 < st.steps:
            self._sampler_before_ahead = self.sampler.get_state()
            run.ahead = self._sample(run)
            self._prefetch(run.prefetchers, run.ahead)
        if run.count_tokens is not None:
            run.tokens_since += int(run.count_tokens(batch))
        return batch

    def _sample(self, run: StageRun) -> dict:
        st = run.stage
        with blame(run.who, self.recipe.file):
            return run.objective.sample(self.dataset, st.split, st.batch_size, self.sampler)  # the global batch

    @staticmethod
    def _current_lr(run: StageRun) -> float:
        lr = run.opts[0].param_groups[0]["lr"]
        return float(lr)  # a tensor under run.cuda_graphs: read only at log steps

    def _check_finite(self, run: StageRun) -> None:
        """Stop the run if a step's loss was NaN or inf (one small synchronisation)."""
        bad = run.meter.nonfinite()
        if bad is not None:
            raise NonFiniteLossError(self._nonfinite_message(run.index, run.stage, bad.step, bad.loss, bad.terms))

    def _log_train(self, run: StageRun, done: int, lr_now: float) -> None:
        """train/* means since the last log step, lr, throughput; the progress line."""
        reading = run.meter.read()  # the one host synchronisation of a log step
        if reading.nonfinite is not None:
            bad = reading.nonfinite
            raise NonFiniteLossError(self._nonfinite_message(run.index, run.stage, bad.step, bad.loss, bad.terms))
        means = self._rank_means(reading.means)
        now = time.perf_counter()
        dt = max(now - run.t_log, 1e-9)
        for k, v in means.items():
            self.logger.scalar(f"train/{k}", v, self.step)
        self.logger.scalar("lr", lr_now, self.step)
        self.logger.scalar("throughput/steps_per_s", reading.steps / dt, self.step)
        self.logger.scalar("throughput/samples_per_s", reading.steps * run.stage.batch_size / dt, self.step)  # global
        if run.count_tokens is not None:
            self.logger.scalar("throughput/tokens_per_s", run.tokens_since / dt, self.step)
        self.progress.update(done, means["loss"])
        threads.rebalance()  # runs started or ended since: this run's share of the cores (engram_core.run.threads)
        run.tokens_since, run.t_log = 0, now

    def _rank_means(self, means: dict[str, float]) -> dict[str, float]:
        """Term means averaged over ranks (the loss already is, step by step)."""
        terms = [k for k in means if k != "loss"]
        if self.dist.enabled and terms:
            packed = self.dist.all_reduce_mean(torch.tensor([means[k] for k in terms], dtype=torch.float64))
            means.update(zip(terms, packed.tolist()))
        return means

    def _step_hooks(self, run: StageRun, done: int) -> None:
        """Components' `on_step_end`; the event's loss is the step's loss tensor (reading it
        as a number waits for the GPU)."""
        if not run.step_hooks:
            return
        ev = Event(self.step, run.stage.name, self.model, {"loss": run.meter.last_loss}, self.logger, run.opt_ref, self.run_dir,
                   done, run.stage.steps)
        for fn in run.step_hooks:
            with blame(f"{self._label_of(getattr(fn, '__self__', fn))}.on_step_end", self.recipe.file):
                fn(ev)

    def _prefetchers(self, objective) -> list:
        """`prefetch(batch)` of every component that has one (and does not say
        `prefetches = False`): told each training batch as soon as it is drawn, one step
        before the step that trains on it."""
        return [c for c in self._components(objective) if callable(getattr(c, "prefetch", None)) and getattr(c, "prefetches", True)]

    def _prefetch(self, prefetchers: list, batch) -> None:
        for comp in prefetchers:
            with blame(f"{self._label_of(comp)}.prefetch", self.recipe.file):
                comp.prefetch(batch)

    def _autocast(self):
        return autocast(self.recipe.run.precision, self.device)

    def _set_memory(self, on: bool) -> None:
        if self.memory is not None:
            self.memory.enabled = on

    # ---- fit and eval stages ----------------------------------------------------------

    def _fit(self, index: int, st: FitStage) -> None:
        target = self._fit_target(st)
        self._set_memory(st.memory)
        gen = torch.Generator().manual_seed(self.recipe.run.seed * 1000 + index)
        ctx = FitContext(self.model, self.dataset, self.device, gen, st.batch_size, st.split, self.logger, self.step, self.dist)
        if self.dist.is_main:
            self.console.print(f"[bold]stage {st.name}[/]: {st.target}.{st.action}({', '.join(f'{k}={v!r}' for k, v in st.options.items())})")
        t = time.perf_counter()
        self.model.eval()
        # N ranks: an action the component lists in `sharded_actions` runs on every rank and
        # reduces through ctx.dist; any other runs on rank 0 and the model's state is broadcast.
        # A data set's action runs on every rank (it is not a module; its work is seeded).
        everywhere = not self.dist.enabled or st.target == "data" or st.action in getattr(target, "sharded_actions", ())
        try:
            if everywhere or self.dist.is_main:
                with blame(f"{st.target}.{st.action} (stages.{index}.action)", self.recipe.file):
                    getattr(target, st.action)(ctx, **st.options)
        except ConfigError as exc:
            raise RecipeError([(f"stages.{index}.options" + (f".{exc.key}" if exc.key else ""), exc.message)], self.recipe.file) from None
        if not everywhere:
            self.dist.broadcast_state(self.model)
        self.model.train()
        self._set_memory(True)
        self.console.print(f"  done in {time.perf_counter() - t:.1f}s")
        self._emit("on_stage_end", Event(self.step, st.name, self.model, {}, self.logger, None, self.run_dir))
        self._checkpoint(index, 0, True, [], [])

    def _eval_stage(self, index: int, st: EvalStage) -> None:
        self._set_memory(st.memory)
        obj = self._last_objective(index)
        self.evaluate(st.name, st.split, st.batch_size, st.metrics, obj, None, stage_end=True)
        self._set_memory(True)
        self._emit("on_stage_end", Event(self.step, st.name, self.model, self.stage_results.get(st.name, {}), self.logger, None, self.run_dir))
        self._checkpoint(index, 0, True, [], [])

    def _last_objective(self, index: int):
        for j in range(index, -1, -1):
            if j in self.objectives:
                return self.objectives[j]
        return None

    def evaluate(self, stage: str, split: str, batch_size: int, subset, objective, optimizer, stage_end: bool) -> dict[str, float]:
        """Run the metrics on `split`; log, record and tell components. Returns {tag: value}."""
        was_training = self.model.training
        self.model.eval()
        if objective is not None:
            objective.eval()
        t = time.perf_counter()
        results: dict[str, float] = {}
        for metric, (name, written) in zip(self.metrics, self.metric_types):
            if subset is not None and name not in subset and written not in subset:
                continue
            who = self.labels["metrics"][self.metrics.index(metric)]
            with blame(who, self.recipe.file):
                metric.bind(EvalContext(self.model, self.dataset, split, self.step, stage, objective, batch_size, self.device))
                metric.reset()
                sharded = self.dist.enabled and metric.shardable  # batches dealt round-robin, states reduced
                grad = torch.enable_grad() if getattr(metric, "needs_grad", False) else torch.no_grad()
                batches = metric.batches(self.dataset, split, batch_size)
                if sharded:
                    batches = self.dist.block(list(batches))  # a contiguous block each: rank order is split order
                with grad, self._autocast():
                    for batch in batches:
                        metric.update(self.model, to_device(batch, self.device))
                    if self.dist.enabled:
                        serve_peers()  # row-sharded tables: answer the lookups of ranks with more batches
                if sharded:
                    metric.dist_reduce(self.dist)
                computed = metric.compute()
            for k, v in computed.items():
                results[k if "/" in k else f"eval/{k}"] = float(v)
        if self.memory is not None:
            for k, v in self.memory.stats().items():
                results[f"memory/{k}"] = float(v)
            for k, v in self.memory.histograms().items():
                self.logger.histogram(f"memory/{k}", v, self.step)
        for k, v in results.items():
            self.logger.scalar(k, v, self.step)
        self.logger.flush()
        record = {"stage": stage, "step": self.step, "split": split, "stage_end": stage_end, "time_s": round(time.time() - self.t0, 3), "metrics": results}
        self.metrics_log.append(record)
        if stage_end:
            self.stage_results[stage] = results
        self._emit("on_eval_end", Event(self.step, stage, self.model, results, self.logger, optimizer, self.run_dir), objective)
        if was_training:
            self.model.train()
            if objective is not None:
                objective.train()
        self.progress.note(f"eval @ {self.step} ({time.perf_counter() - t:.1f}s): " + ", ".join(f"{k}={v:.4g}" for k, v in list(results.items())[:6]))
        return results

    # ---- checkpoints ------------------------------------------------------------------

    def _nonfinite_message(self, index: int, st: TrainStage, step: int, loss_value: float, terms: dict) -> str:
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()) or "no terms"
        ck = self.run_dir / "checkpoints" / "last.pt"
        state = load_checkpoint(self.run_dir) if ck.exists() else None
        if state is not None and not nonfinite_tensors(state["model"]):
            where = f"the last checkpoint ({ck}, global step {state['global_step']}) has finite weights"
        else:
            where = "no checkpoint with finite weights was written yet"
        lr = f"{st.lr / 10:.3g}"
        return (f"stage '{st.name}' step {step} (stages.{index}): loss is {loss_value} ({shown}); the run stopped, {where}; "
                f"try a lower learning rate or gradient clipping and resume: "
                f"{runnable('engram-run')} --resume {self.run_dir} stages.{index}.lr={lr}" + ("" if st.grad_clip else f" stages.{index}.grad_clip=1.0"))

    def _checkpoint(self, index: int, stage_step: int, done: bool, opts, scheds, scaler=None) -> None:
        # every rank: its rows of row-sharded tables, with torch.distributed.checkpoint (engram_core.tables.state)
        tables = sharded_state.save(self.run_dir, f"s{index}-{stage_step}" + ("-done" if done else ""), self.model, opts) if self.dist.enabled else None
        if not self.dist.is_main:
            return  # every rank holds the same weights, optimizer and sampler state: rank 0 saves them
        bad = nonfinite_tensors(self.model.state_dict())
        if bad:  # never replace a good checkpoint with weights that are NaN or inf
            self.progress.note(f"checkpoint skipped at step {self.step}: non-finite weights in {', '.join(bad[:3])}")
            return
        self.logger.flush()  # what the checkpoint knows is on disk in the event files too
        state = {
            "format": 1,
            "stage_index": index,
            "stage_step": stage_step,
            "stage_done": done,
            "global_step": self.step,
            "model": self.model.state_dict(),
            "objectives": {str(i): o.state_dict() for i, o in self.objectives.items()},
            "metrics": {str(i): m.state_dict() for i, m in enumerate(self.metrics) if hasattr(m, "state_dict")},
            "optimizers": sharded_state.strip_rows([o.state_dict() for o in opts], opts, self.model),
            "sharded_tables": tables,
            "schedulers": [s.state_dict() for s in scheds],
            "scaler": scaler.state_dict() if scaler is not None else None,
            "world_size": self.dist.world_size,
            "n_records": len(self.metrics_log.records),
            "wall_time_s": time.time() - self.t0 + self.prior_wall,
            "saved_at": time.time(),
        }
        state.update(self._rng_state())
        save_checkpoint(self.run_dir, state)
        sharded_state.prune(self.run_dir, tables["folder"] if tables else None)

    def _rng_state(self) -> dict:
        py = random.getstate()
        npst = np.random.get_state()
        out = {
            "rng_sampler": self._sampler_before_ahead if self._sampler_before_ahead is not None else self.sampler.get_state(),
            "rng_torch": torch.get_rng_state(),
            "rng_python": [py[0], list(py[1]), py[2]],
            "rng_numpy": [npst[0], torch.from_numpy(npst[1].astype(np.int64)), int(npst[2]), int(npst[3]), float(npst[4])],
        }
        if self.device.type == "cuda":
            out["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def _restore_rng(self, state: dict) -> None:
        self.sampler.set_state(state["rng_sampler"])
        torch.set_rng_state(state["rng_torch"])
        py = state["rng_python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = state["rng_numpy"]
        np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)

    def _restore_common(self, state: dict) -> None:
        sharded_state.load_model_state(self.run_dir, state, self.model)
        for i, o in self.objectives.items():
            if str(i) in state["objectives"]:
                o.load_state_dict(state["objectives"][str(i)])
        for i, m in enumerate(self.metrics):
            if str(i) in state.get("metrics", {}) and hasattr(m, "load_state_dict"):
                m.load_state_dict(state["metrics"][str(i)])
        self.step = state["global_step"]
        self.prior_wall = state.get("wall_time_s", 0.0)
        self._restore_rng(state)

    # ---- summary ----------------------------------------------------------------------

    def summary(self) -> dict:
        recs = self.metrics_log.records if self.metrics_log is not None else []
        final = recs[-1]["metrics"] if recs else {}
        return {
            "name": self.recipe.name,
            "status": self.status,
            "run_dir": str(self.run_dir),
            "steps": self.step,
            "wall_time_s": round(time.time() - self.t0 + self.prior_wall, 3),
            "device": str(self.device),
            "world_size": self.dist.world_size,
            "final": final,
            "stages": dict(self.stage_results),
            "error": self.error,
        }
