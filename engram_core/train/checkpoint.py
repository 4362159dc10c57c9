"""Checkpoints: the engine's checkpoint state (`CheckpointState`, a part of `Engine`), and
`engram-run --resume RUN_DIR key=value ...`: resume with settings that keep the checkpoint valid.

A diverged run is resumed with a lower learning rate, a stopped one with more steps. An
override may change what the optimiser does and when things happen — never a shape, a
data set or a component, which the checkpoint's tensors and RNG states depend on. The
overrides are applied to the run's `recipe.toml`, checked like any recipe, and written
back into it (with a comment line saying when and what), so the directory keeps stating
exactly what ran — once the engine has built the recipe and the checkpoint fits it: a
resume that fails leaves the run exactly as it was.
"""

from __future__ import annotations

import fnmatch
import random
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import RecipeError
from ..recipe import apply_override, load_recipe, parse_override, read_toml, split_key
from ..run.rundir import load_checkpoint, nonfinite_tensors, save_checkpoint

# settings a checkpoint stays valid under (glob patterns of override keys)
RESUMABLE = (
    "run.device",
    "run.precision",
    "run.matmul_precision",
    "run.threads",
    "stages.*.steps",
    "stages.*.lr",
    "stages.*.weight_decay",
    "stages.*.betas",
    "stages.*.optimizer_impl",
    "stages.*.momentum",
    "stages.*.schedule",
    "stages.*.warmup_steps",
    "stages.*.min_lr_ratio",
    "stages.*.grad_clip",
    "stages.*.eval_every",
    "stages.*.checkpoint_every",
    "stages.*.log_every",
    "stages.*.batch_size",
    "stages.*.param_groups.*.lr",
    "stages.*.param_groups.*.weight_decay",
)

HEADER = "# resumed"


def check_resumable(run_dir: Path, overrides: list[str]) -> None:
    """Every override names a setting a checkpoint stays valid under (else one line each, exit 2)."""
    problems = []
    for item in overrides:
        key, _ = parse_override(item)
        if not any(fnmatch.fnmatchcase(".".join(split_key(key)), pat) for pat in RESUMABLE):
            problems.append((key, NOT_RESUMABLE))
    if problems:
        raise RecipeError(problems, str(Path(run_dir) / "recipe.toml"))


NOT_RESUMABLE = ("cannot change on --resume: the checkpoint's weights, data or components depend on it; "
                 "resumable: learning rates, steps, schedule, grad clip, eval/checkpoint/log cadence, "
                 "batch size, run.device (start a new run for anything else)")


def resume_recipe(run_dir: Path, overrides: list[str]):
    """(recipe, text): the run directory's recipe with `overrides` applied and checked, and
    the recipe.toml to write back — by the caller, once the engine has built it (a resume
    that fails must leave the run as it was). `text` is None without overrides."""
    recipe_file = Path(run_dir) / "recipe.toml"
    if not overrides:
        return load_recipe(recipe_file), None
    state = load_checkpoint(run_dir)
    problems = []
    parsed = []
    for item in overrides:
        try:
            key, value = parse_override(item)
        except RecipeError as exc:
            raise exc.with_file(str(recipe_file)) from None
        path = ".".join(split_key(key))
        if not any(fnmatch.fnmatchcase(path, pat) for pat in RESUMABLE):
            problems.append((key, NOT_RESUMABLE))
            continue
        parts = path.split(".")
        if parts[0] == "stages" and state is not None:
            i = int(parts[1]) if parts[1].isdecimal() and parts[1].isascii() else -1
            current = state["stage_index"] + (1 if state["stage_done"] else 0)
            if 0 <= i < current:
                problems.append((key, f"stage {i} already finished; only stage {current} onwards can change on --resume"))
                continue
            if i == state["stage_index"] and parts[2] == "steps" and isinstance(value, int) and value <= state["stage_step"]:
                problems.append((key, f"must be > {state['stage_step']}, the steps stage {i} has already taken"))
                continue
        parsed.append((key, value))
    if problems:
        raise RecipeError(problems, str(recipe_file))
    raw = read_toml(recipe_file)
    try:
        for key, value in parsed:
            apply_override(raw, key, value)
    except RecipeError as exc:
        raise exc.with_file(str(recipe_file)) from None
    recipe = load_recipe(recipe_file, raw=raw)
    old_header = [line for line in recipe_file.read_text(encoding="utf-8").splitlines() if line.startswith(HEADER)]
    step = state["global_step"] if state is not None else 0
    note = f"{HEADER} {time.strftime('%Y-%m-%dT%H:%M:%S%z')} at global step {step} with: {' '.join(overrides)}"
    return recipe, "\n".join([*old_header, note, ""]) + recipe.to_toml(include_sweep=False)


def check_checkpoint_fits(run_dir: Path, engine, recipe) -> None:
    """The checkpoint was made by the model the engine just built from recipe.toml (else one
    line: an edited recipe.toml no longer matches it), before the engine touches the run."""
    state = load_checkpoint(run_dir)
    if state is None:
        return
    file = str(Path(run_dir) / "recipe.toml")
    ckpt = Path(run_dir) / "checkpoints" / "last.pt"
    fix = f"undo the edit of recipe.toml (the checkpoint is {ckpt}), or start a new run with the edited recipe"
    if state["stage_index"] >= len(recipe.stages):
        raise RecipeError([("stages", f"the checkpoint is in stage {state['stage_index']}, but the recipe has "
                                      f"{len(recipe.stages)} stages: {fix}")], file)
    elsewhere = set().union(*engine.registry.pm.hook.engram_extra_state_keys(state=state))
    problems = _state_problems("", state["model"], engine.model, elsewhere)
    for i, objective in engine.objectives.items():
        saved = state.get("objectives", {}).get(str(i))
        if saved is not None:
            problems += _state_problems(f"objective.{i}.", saved, objective, set())
    if problems:
        raise RecipeError([("", f"recipe.toml no longer matches the checkpoint ({'; '.join(problems[:3])}"
                                f"{'; ...' if len(problems) > 3 else ''}): {fix}")], file)


def _state_problems(prefix: str, saved: dict, module, may_be_absent: set) -> list[str]:
    """What keeps `saved` from loading into `module`: shapes first (the clearest line), then
    the keys a load reports (the engine loads the same state again when it resumes; a
    component that keeps more state than its parameters, an optimiser held inside a table,
    consumes its own keys)."""
    built = module.state_dict()
    problems = [f"{prefix}{k}: checkpoint {tuple(v.shape)}, model {tuple(built[k].shape)}" for k, v in saved.items()
                if isinstance(v, torch.Tensor) and isinstance(built.get(k), torch.Tensor) and tuple(v.shape) != tuple(built[k].shape)]
    if problems:
        return problems
    try:
        result = module.load_state_dict(saved, strict=False)
    except (RuntimeError, KeyError, ValueError) as exc:
        return [f"{prefix}{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]}"]
    problems = [f"{prefix}{k} is not in the checkpoint" for k in result.missing_keys if k not in may_be_absent]
    problems += [f"{prefix}{k} is in the checkpoint but not in the model" for k in result.unexpected_keys]
    return problems


class CheckpointState:
    """The engine's checkpoint state: writing a stage's checkpoint (model, optimisers, schedules, RNG, the stage's progress) and restoring what every stage shares. A part of `Engine` (engram_core.train.engine)."""

    def _checkpoint(self, index: int, stage_step: int, done: bool, opts, scheds, scaler=None) -> None:
        # every rank: state the checkpoint must not hold (its rows of row-sharded tables), through
        # the engine hook engram_save_extras, which also drops it from rank 0's optimiser states
        opt_states = [o.state_dict() for o in opts] if self.dist.is_main else []
        extras = {}
        if self.dist.enabled:
            tag = f"s{index}-{stage_step}" + ("-done" if done else "")
            for found in self.registry.pm.hook.engram_save_extras(run_dir=self.run_dir, tag=tag, model=self.model,
                                                                   optimizers=opts, optimizer_states=opt_states):
                extras.update(found or {})
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
            "optimizers": opt_states,
            "schedulers": [s.state_dict() for s in scheds],
            "scaler": scaler.state_dict() if scaler is not None else None,
            "world_size": self.dist.world_size,
            "n_records": len(self.metrics_log.records),
            "wall_time_s": time.time() - self.t0 + self.prior_wall,
            "saved_at": time.time(),
        }
        state.update(self._rng_state())
        state.update(extras)
        save_checkpoint(self.run_dir, state)
        self.registry.pm.hook.engram_prune_extras(run_dir=self.run_dir, state=state)

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
        self._load_model_state(state)
        for i, o in self.objectives.items():
            if str(i) in state["objectives"]:
                o.load_state_dict(state["objectives"][str(i)])
        for i, m in enumerate(self.metrics):
            if str(i) in state.get("metrics", {}) and hasattr(m, "load_state_dict"):
                m.load_state_dict(state["metrics"][str(i)])
        self.step = state["global_step"]
        self.prior_wall = state.get("wall_time_s", 0.0)
        self._restore_rng(state)

    def _load_model_state(self, state: dict) -> None:
        """The model's weights from the checkpoint; weights a plugin keeps elsewhere (each rank's
        rows of row-sharded tables: `engram_extra_state_keys`) are loaded by `engram_load_extras`."""
        elsewhere = set().union(*self.registry.pm.hook.engram_extra_state_keys(state=state))
        if not elsewhere:
            self.model.load_state_dict(state["model"])
        else:
            result = self.model.load_state_dict(state["model"], strict=False)
            wrong = [k for k in result.missing_keys if k not in elsewhere] + list(result.unexpected_keys)
            if wrong:
                raise RuntimeError(f"checkpoint does not match the model: {', '.join(wrong[:5])}")
        self.registry.pm.hook.engram_load_extras(run_dir=self.run_dir, state=state, model=self.model, optimizers=None)
