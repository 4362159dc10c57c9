"""`deq_hrr_accuracy`: classification accuracy plus the memory/solver telemetry of an eval pass.

Reports ``acc`` and ``best_acc`` (best over this run's evaluations, for sweep tables) as
`eval/…`, and, when a memory is active, ``memory/raw_read_cos``, ``memory/clean_read_cos``,
``memory/read_gap`` (clean − raw), ``memory/write_cos``, ``memory/collisions``,
``memory/read_gate``, ``memory/bucket_coverage`` (share of buckets holding a write),
``memory/bucket_hit`` (the query reads the needle's bucket), ``memory/prototype_coverage``
(share of prototypes that win the cleanup for at least one item); always ``memory/solver_iters`` and ``memory/solver_residual``
(the DEQ's forward solver, mean over batches).
"""

from __future__ import annotations

import attrs
import torch

from engram_core.components import BuildContext, Metric, model_device, to_device


@attrs.frozen
class DEQHRRAccuracyConfig:
    """Accuracy and telemetry over the eval split (no keys)."""


class DEQHRRAccuracy(Metric):
    """Accuracy of `forward_classify` and the HRR/DEQ telemetry."""

    def __init__(self, cfg: DEQHRRAccuracyConfig, build: BuildContext):
        self.cfg = cfg
        self.best = float("-inf")
        self.reset()

    # the best accuracy survives checkpoints (the engine saves a metric's state_dict)
    def state_dict(self) -> dict:
        return {"best": float(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state.get("best", float("-inf")))

    def reset(self) -> None:
        self.correct = 0
        self.total = 0
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.winners: set[int] = set()
        self.n_prototypes = 0

    def _add(self, name: str, values: torch.Tensor | float, n: int | None = None) -> None:
        if isinstance(values, torch.Tensor):
            self.sums[name] = self.sums.get(name, 0.0) + float(values.float().sum())
            self.counts[name] = self.counts.get(name, 0) + values.numel()
        else:
            self.sums[name] = self.sums.get(name, 0.0) + float(values) * (n or 1)
            self.counts[name] = self.counts.get(name, 0) + (n or 1)

    @torch.no_grad()
    def update(self, model, batch) -> None:
        device = self.ctx.device if self.ctx is not None else model_device(model)
        batch = to_device(batch, device)
        out = model.head.forward_detailed(batch)
        label = batch["label"]
        n = label.shape[0]
        self.correct += int((out["logits"].argmax(-1) == label).sum())
        self.total += n
        self._add("solver_iters", float(out["solver_iters"]), n)
        self._add("solver_residual", float(out["solver_residual"]), n)
        mem = out.get("memory")
        if mem is not None:
            diag = model.memory.diagnostics(mem, label, batch.get("needle_pos"))
            for name in ("raw_read_cos", "clean_read_cos", "write_cos", "collision", "bucket_hit", "bucket_coverage"):
                if name in diag:
                    self._add(name, diag[name])
            self._add("read_gate", mem["read_gate"])
            self.winners.update(int(i) for i in diag["top1"].unique().tolist())
            self.n_prototypes = model.memory.n_prototypes

    def compute(self) -> dict[str, float]:
        acc = self.correct / max(self.total, 1)
        self.best = max(self.best, acc)
        out = {"acc": acc, "best_acc": self.best}
        mean = {k: self.sums[k] / max(self.counts[k], 1) for k in self.sums}
        out["memory/solver_iters"] = mean.get("solver_iters", 0.0)
        out["memory/solver_residual"] = mean.get("solver_residual", 0.0)
        if "raw_read_cos" in mean:
            out["memory/raw_read_cos"] = mean["raw_read_cos"]
            out["memory/clean_read_cos"] = mean["clean_read_cos"]
            out["memory/read_gap"] = mean["clean_read_cos"] - mean["raw_read_cos"]
            out["memory/read_gate"] = mean["read_gate"]
            out["memory/bucket_coverage"] = mean["bucket_coverage"]
            out["memory/prototype_coverage"] = len(self.winners) / max(self.n_prototypes, 1)
            if "write_cos" in mean:
                out["memory/write_cos"] = mean["write_cos"]
                out["memory/collisions"] = mean["collision"]
                out["memory/bucket_hit"] = mean["bucket_hit"]
        return out
