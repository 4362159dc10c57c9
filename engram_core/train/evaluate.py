"""Evaluation: every metric over an eval split, logged and written to metrics.jsonl. A part of `Engine` (engram_core.train.engine)."""

from __future__ import annotations

import time

import torch

from ..components import EvalContext, Event, to_device
from ..recipe import EvalStage, TrainStage
from ..run.commands import runnable
from ..run.rundir import (
    load_checkpoint,
    nonfinite_tensors,
)
from .validate import blame


class Evaluation:
    """Evaluation: every metric over an eval split, logged and written to metrics.jsonl. A part of `Engine` (engram_core.train.engine)."""

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
                        self.registry.pm.hook.engram_serve_peers()  # row-sharded tables: answer the lookups of ranks with more batches
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
        if stage_end:
            self._record_stage_end(stage, split, results)
        else:
            self.metrics_log.append(self._eval_record(stage, split, results, stage_end=False))
        self._emit("on_eval_end", Event(self.step, stage, self.model, results, self.logger, optimizer, self.run_dir), objective)
        if was_training:
            self.model.train()
            if objective is not None:
                objective.train()
        self.progress.note(f"eval @ {self.step} ({time.perf_counter() - t:.1f}s): " + ", ".join(f"{k}={v:.4g}" for k, v in list(results.items())[:6]))
        return results

    def _eval_record(self, stage: str, split: str, results: dict[str, float], stage_end: bool) -> dict:
        return {"stage": stage, "step": self.step, "split": split, "stage_end": stage_end, "time_s": round(time.time() - self.t0, 3),
                "metrics": results}

    def _record_stage_end(self, stage: str, split: str, results: dict[str, float], note: dict | None = None) -> None:
        """The stage's final metrics: a stage-end record (`note`: more keys, e.g. `stopped_at`)."""
        self.metrics_log.append({**self._eval_record(stage, split, results, stage_end=True), **(note or {})})
        self.stage_results[stage] = results

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
