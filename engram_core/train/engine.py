"""The engine: build a recipe's components, run its stages, evaluate, write the run directory.

The only module that knows all five kinds of component. Read it top to bottom:
`build` → `run` → per stage `_train` / `_fit` / `_eval_stage` → `evaluate` → `summary`.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..components import BuildContext, Event, FitContext, Model
from ..errors import ConfigError, EngramError, NonFiniteLossError, RecipeError
from ..recipe import FitStage, Recipe, Resolved, TrainStage
from ..registry import Registry, load_registry
from ..run import distributed
from ..run.accel import check_compilable, set_matmul_precision
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
    remove_stale_temporaries,
)
from ..run.tb import NullLogger, drop_events_after
from .checkpoint import CheckpointState
from .evaluate import Evaluation
from .loop import StageRun, TrainLoop  # noqa: F401  (StageRun: re-exported)
from .validate import blame, component_label, describe, make_component, parameter_problems, stage_problems


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


class Engine(TrainLoop, Evaluation, CheckpointState):
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
        self.stopped_at: dict[str, int] = {}  # train stages that `stop_at` ended early: the stage step
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
        set_matmul_precision(r.run.matmul_precision, self.device)
        base = dict(seed=r.run.seed, device=self.device, run_dir=self.run_dir, registry=self.registry)
        self.dataset = self._make(r.data, BuildContext(**base))
        spec = self.dataset.spec
        bc = BuildContext(spec=spec, dataset=self.dataset, **base)
        self.head = self._make(r.head, bc)
        self.memory = None
        point = None
        if r.memory is not None:
            self.memory = self._make(r.memory, BuildContext(spec=spec, dataset=self.dataset, head=self.head, **base))
            points = [p for p in r.memory.component.points if p in r.head.component.points]
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
                    if "stopped_at" in rec:
                        self.stopped_at[rec["stage"]] = rec["stopped_at"]
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

    # ---- train: the loop, one step, forward/backward, optimiser step --------------------
    #
    # `_train` is the stage's loop; `train_step` one optimiser step; `forward_backward_step`
    # one micro-batch. Nothing in the steady state reads a device value on the host: loss
    # and terms stay in `StageRun.meter` (engram_core.train.meter) until a log step, and the loss
    # is checked for NaN/inf there, before every evaluation and checkpoint, and at the
    # stage's end (every step on the CPU, where reading it costs nothing).

    # ---- train: the stage's set-up, batches, logging, checks ---------------------------

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

    # ---- checkpoints ------------------------------------------------------------------

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
            "stopped_at": dict(self.stopped_at),  # stage -> step, where `stop_at` ended a train stage early
            "error": self.error,
        }
