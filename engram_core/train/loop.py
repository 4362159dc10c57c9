"""The training loop of a train stage: `_train` → `train_step` → `forward_backward_step` and `_optimizer_step`, with the stage's set-up (parameters, optimisers, schedules, resume) around it. A part of `Engine` (engram_core.train.engine), which holds the state it reads."""

from __future__ import annotations

import contextlib
import fnmatch
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

from ..components import Event, to_device
from ..errors import NonFiniteLossError, RecipeError, did_you_mean
from ..recipe import TrainStage
from ..run import distributed, threads
from ..run.accel import autocast, compile_failure, grad_scaler, is_compile_failure
from .graphs import CapturedStep, make_capturable
from .meter import StepMeter
from .stopping import StopBetweenSteps
from .validate import blame


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
    eager_forward: Callable | None  # run.compile: the stage's first forward runs this (see forward_backward_step)
    local_size: int
    splits: bool  # micro-batches or rank shards
    meter: StepMeter
    check_every_step: bool  # on the CPU, reading the loss costs nothing: stop at the very step
    count_tokens: Callable | None
    prefetchers: list
    step_hooks: list
    evaluates: bool
    clip: Callable  # clip(params, max_norm): torch's clip_grad_norm_ or a plugin's (`_grad_clipper`)
    captured: CapturedStep | None = None
    ahead: dict | None = None  # the next step's batch, drawn early and already handed to `prefetch`
    tokens_since: int = 0
    t_log: float = attrs.field(factory=time.perf_counter)

    @property
    def opt_ref(self):
        return self.opts[0] if len(self.opts) == 1 else self.opts


class TrainLoop:
    """The training loop of a train stage: `_train` → `train_step` → `forward_backward_step` and `_optimizer_step`, with the stage's set-up (parameters, optimisers, schedules, resume) around it. A part of `Engine` (engram_core.train.engine), which holds the state it reads."""

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

    def _held_rows(self) -> list:
        """(name, holder) of the parameters whose rows live outside them (engine hook `engram_held_rows`)."""
        return [pair for found in self.registry.pm.hook.engram_held_rows(model=self.model) for pair in found]

    def _grad_clipper(self) -> Callable:
        """`clip(params, max_norm)`: torch's, unless a plugin clips where the model holds
        gradients torch's call would miss (row-sharded tables: the norm over every rank's rows,
        `engram_grad_clipper`). Asked once a stage: a hook call a step costs an eager step time."""
        return self.registry.pm.hook.engram_grad_clipper(model=self.model) or torch.nn.utils.clip_grad_norm_

    def _held_row_problems(self) -> list[tuple[str, str]]:
        """Tables whose rows live outside their parameter (memory.placement) can only be
        trained by an optimiser registered with `holds_rows`: said before any stage runs."""
        held = [n for n, _ in self._held_rows()]
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

    def _train(self, index: int, st: TrainStage, state: dict | None) -> None:
        run = self._start_stage(index, st, state)
        self.progress.start(st.name, st.steps, run.start)
        with StopBetweenSteps(self.progress.note, active=not self.dist.enabled) as signalled:
            self._train_steps(index, st, run, signalled)
        if signalled.requested:
            raise KeyboardInterrupt

    def _train_steps(self, index: int, st: TrainStage, run: StageRun, signalled: StopBetweenSteps) -> None:
        """The stage's steps and its end; a signal (`signalled`) stops it after a whole step,
        checkpointed, or after the stage's end if it came in the last step."""
        stopped = None  # the evaluation that reached `stop_at`, if one did
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
                results = self.evaluate(st.name, st.eval_split, st.batch_size, st.metrics, run.objective, run.opt_ref, stage_end=False)
                if self._reached(index, st, results):
                    self.stopped_at[st.name], stopped = done, results
                    self.progress.note(f"stage {st.name}: {st.stop_at.metric} reached {st.stop_at.threshold:g} at step {done}; stopping (stop_at)")
                    break
            periodic = bool(st.checkpoint_every) and done % st.checkpoint_every == 0
            if (periodic or signalled.requested) and done != st.steps:
                self._check_finite(run)
                self._checkpoint(index, done, False, run.opts, run.scheds, run.scaler)
            if signalled.requested and done != st.steps:
                return
        self._check_finite(run)
        self.progress.finish()
        if stopped is not None:  # the evaluation that stopped it is the stage's last: the model has not changed since
            self._record_stage_end(st.name, st.eval_split, stopped, {"stopped_at": self.stopped_at[st.name]})
        elif run.evaluates:
            self.evaluate(st.name, st.eval_split, st.batch_size, st.metrics, run.objective, run.opt_ref, stage_end=True)
        self._emit("on_stage_end", Event(self.step, st.name, self.model, self.stage_results.get(st.name, {}), self.logger, run.opt_ref,
                                         self.run_dir, st.steps, st.steps), run.objective)
        self._set_memory(True)
        self._checkpoint(index, st.steps, True, [], [])

    def _reached(self, index: int, st: TrainStage, results: dict[str, float]) -> bool:
        """Whether an evaluation reached `stop_at` (a metric it did not give is a recipe error)."""
        stop = st.stop_at
        if stop is None:
            return False
        if stop.metric not in results:
            raise RecipeError([(f"stages.{index}.stop_at.metric", f"the stage's evaluation gives no {stop.metric!r}"
                                f"{did_you_mean(stop.metric, list(results))}; it gives {', '.join(results)}")], self.recipe.file)
        value = results[stop.metric]
        return value >= stop.threshold if stop.mode == "max" else value <= stop.threshold

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
            # run.compile: the first forward is eager, so components' one-off host-side checks
            # (the backbone reads its masks on the host once per mode) neither split the
            # compiled graph nor stay in it; later forwards are compiled
            forward, run.eager_forward = run.eager_forward or run.forward, None
            try:
                with run.amp, blame(run.who, self.recipe.file):
                    loss, terms = forward(piece)
            except Exception as exc:
                cause = getattr(exc, "original", exc)  # blame() wraps what the component raised
                if run.compiled and not self._compile_checked and is_compile_failure(cause):
                    raise compile_failure(cause, self._compiled()) from None
                raise
            self._compile_checked = self._compile_checked or forward is run.forward
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
            run.clip(dense, st.grad_clip)
        for o in run.opts:
            if run.scaler is not None:
                run.scaler.step(o)
            else:
                o.step()
        if run.scaler is not None:
            run.scaler.update()

    def _start_stage(self, index: int, st: TrainStage, state: dict | None) -> StageRun:
        """Parameters, optimisers, schedules and the step function of a train stage; on
        resume, their state from the checkpoint."""
        objective = self.objectives[index]
        chosen = self._select_params(st, index)
        names = {n for n, _ in chosen}
        held = [(n, holder) for n, holder in self._held_rows() if n in names]
        for _, holder in held:
            holder.claim(None)  # this stage's optimisers claim them again
        opts = self._optimizers(st, chosen)
        unclaimed = [n for n, holder in held if getattr(holder, "optimizer", None) is None]
        if unclaimed:  # rows kept outside the parameter (memory.placement) that no optimiser here could update
            raise RecipeError([(f"stages.{index}.param_groups", f"{unclaimed[0]} is a table whose rows live outside the model's parameters (its placement) and only a "
                                f"row-wise optimiser trains it: add {{ params = [\"{unclaimed[0]}\"], optimizer = \"rowwise_adam\" }} (or \"rowwise_adagrad\"), "
                                f"or freeze it")], self.recipe.file)
        graphs = self._graphs_for(index, st, held, opts)
        if graphs:
            make_capturable(opts, self.device, f"stages.{index}")
        scheds = [torch.optim.lr_scheduler.LambdaLR(o, self._lr_factor(st)) for o in opts]
        scaler = grad_scaler(self.recipe.run.precision, self.device)
        start = self._restore_stage(state, opts, scheds, scaler) if state is not None else 0
        self._set_memory(st.memory)
        self.model.train()
        objective.train()
        # one process: objective(model, batch); N ranks: the same under DDP
        forward, no_sync = distributed.wrap_train_step(self.model, objective, self._components(objective), self.dist, self.device)
        eager_forward = None
        if self.recipe.run.compile:
            eager_forward, forward = forward, torch.compile(forward)  # the whole forward and loss; backward through AOTAutograd
        run = StageRun(
            index=index, stage=st, objective=objective, who=self.labels["objectives"][index], start=start,
            params=[p for _, p in chosen], held=held, opts=opts, scheds=scheds, scaler=scaler, forward=forward, no_sync=no_sync,
            amp=autocast(self.recipe.run.precision, self.device, cache=not graphs), compiled=self.recipe.run.compile, eager_forward=eager_forward,
            local_size=st.batch_size // self.dist.world_size, splits=self.dist.enabled or st.grad_accum > 1,
            meter=StepMeter(self.device, first_step=start, capacity=min(st.log_every, st.steps) + 1), check_every_step=self.device.type != "cuda",
            count_tokens=getattr(self.dataset, "count_tokens", None), prefetchers=self._prefetchers(objective),
            step_hooks=[c.on_step_end for c in self._components(objective) if hasattr(c, "on_step_end")],
            evaluates=bool(self.metrics) and st.metrics != (),  # `metrics = []`: this stage does not evaluate
            clip=self._grad_clipper(),
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
        self.registry.pm.hook.engram_load_extras(run_dir=self.run_dir, state=state, model=self.model, optimizers=opts)  # rows this rank owns
        for sc, s in zip(scheds, state["schedulers"]):
            sc.load_state_dict(s)
        for o, sc, groups in zip(opts, scheds, recipe_groups):
            for g, fresh in zip(o.param_groups, groups):
                # only what the recipe changed: the rate keeps its schedule factor and any
                # scaling a component applied (deq-hrr's warm restarts), so plain resume is exact
                if fresh["initial_lr"] != g["initial_lr"]:
                    g["lr"] = g["lr"] * fresh["initial_lr"] / g["initial_lr"]
                if isinstance(fresh["lr"], torch.Tensor) and isinstance(g["lr"], torch.Tensor) and g["lr"] is not fresh["lr"]:
                    # run.cuda_graphs: the captured step must read the rate from the device tensor
                    # the schedule fills in place; the checkpoint's copy was loaded to the CPU, and a
                    # fused CUDA optimiser reads a CPU rate once, when the step is captured, and keeps it
                    g["lr"] = fresh["lr"].copy_(g["lr"])
                for k, v in fresh.items():
                    if k != "lr" and g.get(k) != v:
                        g[k] = v
            sc.base_lrs = [g["initial_lr"] for g in o.param_groups]
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        self._restore_rng(state)
        return state["stage_step"]

    def _graphs_for(self, index: int, st: TrainStage, held, opts) -> bool:
        """Whether this stage's steps are replayed as a CUDA graph. `run.cuda_graphs = true`
        makes what cannot be captured a one-line error before the stage starts; "auto" runs
        such a stage eagerly (saying why on CUDA, where graphs were possible at all)."""
        mode = self.recipe.run.cuda_graphs
        if mode is False:
            return False
        why = self._graph_obstacle(index, st, held, opts)
        if why is None:
            return True
        if mode == "auto":
            if self.device.type == "cuda":
                self.progress.note(f"stage {st.name}: eager steps (run.cuda_graphs = \"auto\": it {why})")
            return False
        raise RecipeError([("run.cuda_graphs", f"{why}; set run.cuda_graphs = false")], self.recipe.file)

    def _graph_obstacle(self, index: int, st: TrainStage, held, opts) -> str | None:
        """What keeps `run.cuda_graphs` from capturing this stage's step, known before it starts
        (what only the capture can find, a host read inside the step, stays an error there)."""
        if self.device.type != "cuda":
            return f"needs CUDA (this run is on {self.device})"
        if self.dist.enabled:
            return f"runs in one process (this run has {self.dist.world_size} ranks)"
        if st.grad_accum > 1:
            return f"needs grad_accum = 1 (stages.{index}.grad_accum = {st.grad_accum})"
        if self.recipe.run.precision == "fp16":
            return "cannot capture fp16 loss scaling (use run.precision = \"bf16\")"
        if held or self._prefetchers(self.objectives[index]):
            return "cannot capture tables whose rows are fetched between steps (memory.placement)"
        if self.recipe.run.cuda_graphs == "auto":  # with true, make_capturable names the optimiser
            plain = next((type(o).__name__ for o in opts if "capturable" not in o.defaults), None)
            if plain:
                return f"needs an optimiser whose step can be captured (capturable: adam, adamw), got {plain}"
        return None

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
