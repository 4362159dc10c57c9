"""`deq_hrr_task`: task cross-entropy + λ·InfoNCE on memory reads, λ from the NCEScheduler.

Per epoch (= one `eval_every` interval of a train stage) `on_eval_end` advances the
scheduler with the mean raw read cosine of the training batches since the last
evaluation and the validation accuracy, logs `memory/lambda`, `memory/read_ema`,
`memory/gate_open`, `memory/gate_open_fraction`, `memory/oracle_mix`,
`memory/lr_scale`, `memory/post_gate_drop` (the alarm) and appends a row to
``<run_dir>/per_epoch.csv``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F

from engram_core.components import BuildContext, Objective
from engram_core.config import ConfigError, field, non_negative, positive

from .hrr import expected_recall_cosine
from .scheduler import NCEScheduler, NCESchedulerConfig

PER_EPOCH_COLUMNS = (
    "epoch", "step", "stage", "val_acc", "best_acc", "raw_read_cos", "clean_read_cos", "read_gap", "write_cos",
    "collisions", "bucket_coverage", "read_gate", "train_read_cos", "read_ema", "gate_open", "gate_open_fraction",
    "lambda", "oracle_mix", "lr_scale", "post_gate_drop", "post_gate_drop_epochs", "solver_iters", "solver_residual",
)


def lookup(metrics: dict, name: str) -> float | None:
    """A metric by bare name, whichever way the engine keyed it (`acc`, `eval/acc`, `memory/x`)."""
    for key in (name, f"eval/{name}", f"memory/{name}"):
        if key in metrics and metrics[key] is not None:
            try:
                value = float(metrics[key])
            except (TypeError, ValueError):
                continue
            if math.isfinite(value):
                return value
    return None


def capacity_threshold(cfg: NCESchedulerConfig, build: BuildContext | None) -> NCESchedulerConfig:
    """`read_threshold_capacity` · 1/√(n+1) as the read threshold, n = the data set's pairs per sequence.

    A trace of n superposed pairs reads one back at cosine ≈ 1/√(n+1) (Gaussian keys,
    `hrr.expected_recall_cosine`): a threshold above that can never be reached.
    """
    if cfg.read_threshold_capacity <= 0:
        return cfg
    spec = getattr(build, "spec", None)
    n_pairs = spec.get("n_pairs") if spec is not None else None
    if not n_pairs:
        raise ConfigError("nce_scheduler.read_threshold_capacity",
                          "needs a data set that says how many pairs a trace holds (n_pairs, e.g. needle); "
                          "set read_threshold instead")
    return attrs.evolve(cfg, read_threshold=cfg.read_threshold_capacity * expected_recall_cosine(int(n_pairs)))


@attrs.frozen
class DEQHRRTaskConfig:
    """Cross-entropy on the label + λ·InfoNCE(read, prototypes), λ scheduled on read quality."""

    nce_temperature: float = field(0.1, help="InfoNCE temperature over cosine(read, prototype)", validator=positive)
    label_smoothing: float = field(0.0, help="label smoothing of the task cross-entropy", validator=non_negative)
    nce_scheduler: NCESchedulerConfig = field(factory=NCESchedulerConfig, help="the InfoNCE gate and λ ramp (see NCEScheduler)")
    per_epoch_csv: bool = field(True, help="append one row per epoch to <run_dir>/per_epoch.csv")


class DEQHRRTaskObjective(Objective):
    """Task CE + λ·InfoNCE on HRR reads; owns the `NCEScheduler` (saved in checkpoints)."""

    def __init__(self, cfg: DEQHRRTaskConfig, build: BuildContext):
        super().__init__()
        self.cfg = cfg
        self.scheduler = NCEScheduler(capacity_threshold(cfg.nce_scheduler, build))
        self._read_sum = 0.0
        self._read_count = 0
        self._lr_marks: dict[int, tuple[float, float]] = {}

    def forward(self, model, batch):
        head = model.head
        training = model.training and torch.is_grad_enabled()
        sched = self.scheduler
        oracle_mix = sched.oracle_mix if training else 0.0
        detach_writes = training and sched.in_cooldown
        out = head.forward_detailed(batch, oracle_mix=oracle_mix, detach_writes=detach_writes)
        label = batch["label"]
        ce = F.cross_entropy(out["logits"], label, label_smoothing=self.cfg.label_smoothing)
        with torch.no_grad():
            acc = (out["logits"].argmax(-1) == label).float().mean()
        terms = {"ce": ce.detach(), "acc": acc, "solver_iters": float(out["solver_iters"])}
        loss = ce
        mem = out.get("memory")
        if mem is not None:
            memory = model.memory
            protos = F.normalize(memory.prototypes, dim=-1)
            scores = F.normalize(mem["raw"], dim=-1) @ protos.T
            # the read's target: the label (needle), or the recalled value when the data set names it
            read_target = batch.get("read_target", label)
            nce = F.cross_entropy(scores / self.cfg.nce_temperature, read_target)
            lam = sched.current_lambda
            if lam > 0:
                loss = loss + lam * nce
            with torch.no_grad():
                raw_cos = scores.gather(1, read_target.view(-1, 1)).mean()
            if training:
                self._read_sum += float(raw_cos)
                self._read_count += 1
            terms.update({"nce": nce.detach(), "lambda": lam, "raw_read_cos": raw_cos,
                          "read_gate": mem["read_gate"].detach().mean(), "oracle_mix": oracle_mix})
        terms["loss"] = loss.detach()
        return loss, terms

    # -- events ---------------------------------------------------------------------------------

    def on_step_end(self, event) -> None:
        if event.optimizer is None:
            return
        self.scheduler.take_cooldown_batch()
        self._apply_lr_scale(event.optimizer)

    def _apply_lr_scale(self, optimizers) -> None:
        """Scale every group's LR by the scheduler's warm-restart factor.

        The engine's LR schedule may rewrite `lr` each step (then we scale its value) or
        leave it alone (then we must not compound): we remember the LR we set, and if the
        group still holds it, the unscaled base is the one we remembered.
        """
        scale = self.scheduler.lr_scale
        for opt in optimizers if isinstance(optimizers, (list, tuple)) else [optimizers]:
            for group in opt.param_groups:
                mark = self._lr_marks.get(id(group))
                current = group["lr"]
                base = mark[0] if mark is not None and math.isclose(current, mark[1], rel_tol=1e-9, abs_tol=1e-15) else current
                group["lr"] = base * scale
                self._lr_marks[id(group)] = (base, group["lr"])

    def on_eval_end(self, event) -> None:
        if event.optimizer is None:  # eval stages do not advance the schedule
            return
        metrics = dict(event.metrics or {})
        read_quality = self._read_sum / self._read_count if self._read_count else lookup(metrics, "raw_read_cos")
        self._read_sum, self._read_count = 0.0, 0
        val_acc = lookup(metrics, "acc")
        summary = self.scheduler.epoch_end(read_quality, val_acc)
        if event.logger is not None:
            for name, value in summary.items():
                if name != "epoch":
                    event.logger.scalar(f"memory/{name}", value, event.step)
        self._apply_lr_scale(event.optimizer)
        if self.cfg.per_epoch_csv and event.run_dir is not None:
            self._write_row(Path(event.run_dir) / "per_epoch.csv", event, metrics, read_quality, val_acc, summary)

    def _write_row(self, path: Path, event, metrics, read_quality, val_acc, summary) -> None:
        def m(name):
            v = lookup(metrics, name)
            return "" if v is None else f"{v:.6g}"

        best = self.scheduler.best_acc
        row = {
            "epoch": int(summary["epoch"]), "step": event.step, "stage": event.stage,
            "val_acc": "" if val_acc is None else f"{val_acc:.6g}",
            "best_acc": "" if not math.isfinite(best) else f"{best:.6g}",
            "raw_read_cos": m("raw_read_cos"), "clean_read_cos": m("clean_read_cos"), "read_gap": m("read_gap"),
            "write_cos": m("write_cos"), "collisions": m("collisions"), "bucket_coverage": m("bucket_coverage"),
            "read_gate": m("read_gate"),
            "train_read_cos": "" if read_quality is None else f"{read_quality:.6g}",
            "solver_iters": m("solver_iters"), "solver_residual": m("solver_residual"),
        }
        for k in ("read_ema", "gate_open", "gate_open_fraction", "lambda", "oracle_mix", "lr_scale", "post_gate_drop",
                  "post_gate_drop_epochs"):
            row[k] = f"{summary[k]:.6g}"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_replayed_rows(path, event.step)
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=PER_EPOCH_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    @staticmethod
    def _drop_replayed_rows(path: Path, step: int) -> None:
        """After a resume, epochs past the checkpoint are evaluated again: drop their old rows."""
        if not path.exists():
            return
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        keep = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) < step]
        if len(keep) == len(rows):
            return
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=PER_EPOCH_COLUMNS)
            writer.writeheader()
            writer.writerows(keep)
        tmp.replace(path)

    # -- checkpoint state: the partial epoch's read accumulator ----------------------------------

    def get_extra_state(self) -> dict:
        return {"read_sum": float(self._read_sum), "read_count": int(self._read_count)}

    def set_extra_state(self, state: dict) -> None:
        self._read_sum = float(state.get("read_sum", 0.0))
        self._read_count = int(state.get("read_count", 0))
