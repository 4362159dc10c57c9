"""`deq_hrr_accuracy`: classification accuracy plus the memory/solver telemetry of an eval pass.

Reports ``acc`` and ``best_acc`` (best over this run's evaluations, for sweep tables) as
`eval/…`, and, when a memory is active, ``memory/raw_read_cos``, ``memory/clean_read_cos``,
``memory/read_gap`` (clean − raw), ``memory/write_cos``, ``memory/collisions``,
``memory/read_gate``, ``memory/bucket_coverage`` (share of buckets holding a write),
``memory/bucket_hit`` (the query reads the needle's bucket), ``memory/prototype_coverage``
(share of prototypes that win the cleanup for at least one item); always ``memory/solver_iters`` and ``memory/solver_residual``
(the DEQ's forward solver, mean over batches).

Length generalisation: on a data set with `eval@L` splits (needle's `eval_lengths`) it
also reports ``acc@L`` for each of them and ``acc@<length of the evaluated split>``, in the
stages whose name matches `lengths_in`.

Scheduler state (when the objective has an `NCEScheduler`): ``memory/gate_opened``,
``memory/gate_open_epoch`` (0 = never), ``memory/gate_open_fraction``, ``memory/lambda``,
``memory/post_gate_drop_epochs`` (epochs the post-gate drop alarm was raised) and
``memory/best_pre_gate_acc``. During a train stage these describe the epochs completed
before this evaluation; in an eval stage after training, the whole schedule.
``majority_acc``: the accuracy of always answering the training split's most frequent class.

Knock-outs of one path (`knockouts`, in the stages matching `knockouts_in`): the same
eval split once more per named knock-out of the head (`head.KNOCKOUTS`), reported as
``acc_without_<path>``: ``acc_without_read_state`` (the read no longer enters the query
state; its vote still reaches the logits) and ``acc_without_vote`` (the vote is dropped;
the read still enters the state). A stage with ``memory = false`` removes both.
"""

from __future__ import annotations

import fnmatch
import math

import attrs
import torch

from engram_core.components import BuildContext, Metric, model_device, to_device
from engram_core.config import ConfigError, field

from .head import KNOCKOUTS

LENGTH_SPLIT = "eval@"


def _known_knockouts(inst, attribute, value):
    unknown = [k for k in value if k not in KNOCKOUTS]
    if unknown:
        raise ConfigError(attribute.name, f"unknown knock-out {unknown[0]!r}: expected a list of {', '.join(map(repr, KNOCKOUTS))}")


@attrs.frozen
class DEQHRRAccuracyConfig:
    """Accuracy and telemetry over the eval split, plus accuracy on every `eval@L` split."""

    lengths_in: tuple[str, ...] = field(("*",), help="stage-name globs in which acc@L is measured on the eval@L "
                                                     "splits (e.g. ['final'] to skip them during training)")
    majority: bool = field(True, help="report majority_acc (the training split's most frequent class)")
    knockouts: tuple[str, ...] = field((), help="paths of the memory read to knock out, one at a time, for an extra "
                                                "accuracy acc_without_<path>: 'read_state' (the read added to the query "
                                                "state; the vote stays), 'vote' (the prototype scores added to the "
                                                "logits; the state path stays)", validator=_known_knockouts)
    knockouts_in: tuple[str, ...] = field(("*",), help="stage-name globs in which the knock-outs are measured "
                                                       "(e.g. ['final'])")


class DEQHRRAccuracy(Metric):
    """Accuracy of `forward_classify` and the HRR/DEQ telemetry."""

    directions = {"acc": "higher", "best_acc": "higher", "acc@*": "higher", "acc_without_*": "higher"}
    groups = {"majority_acc": "reference"}
    references = {"acc": {"majority": "majority_acc"}, "acc@*": {"majority": "majority_acc"}}

    # distributed eval: `batches` tells `update` which split a batch is from as it goes (and
    # sizes, a label histogram of varying length and the majority label are not sums), so
    # every rank walks the whole split rather than a shard
    shardable = False

    def __init__(self, cfg: DEQHRRAccuracyConfig, build: BuildContext):
        self.cfg = cfg
        self.best = float("-inf")
        self._current = ""  # the split `batches` is walking: scratch, not a state
        # Never reduced across ranks (shardable = False); the reductions say what each state is.
        self.add_state("correct", 0, dist_reduce_fx="sum")
        self.add_state("total", 0, dist_reduce_fx="sum")
        self.add_state("sums", {}, dist_reduce_fx="sum")  # {telemetry name: weighted sum}
        self.add_state("counts", {}, dist_reduce_fx="sum")  # {telemetry name: items}
        self.add_state("winners", set(), dist_reduce_fx="union")  # prototypes that won a read
        self.add_state("knockout_hits", {}, dist_reduce_fx="sum")  # {knock-out: items right}
        self.add_state("main_length", 0, dist_reduce_fx="max")
        self.add_state("n_prototypes", 0, dist_reduce_fx="max")
        # no built-in reduction fits these: {L: [hits, n]} adds lists, histograms differ in length
        self.add_state("length_hits", {}, dist_reduce_fx="none")
        self.add_state("label_counts", None, dist_reduce_fx="none")
        self.add_state("majority_label", None, dist_reduce_fx="none")  # set by `batches` from the train split

    # the best accuracy survives checkpoints (the engine saves a metric's state_dict)
    def state_dict(self) -> dict:
        return {"best": float(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state.get("best", float("-inf")))

    def batches(self, dataset, split, batch_size):
        """The `eval@L` splits first (accuracy only), then `split`: the memory's recorded
        statistics then describe the evaluated split, as without length splits."""
        stage = self.ctx.stage if self.ctx is not None else ""
        if any(fnmatch.fnmatchcase(stage, pat) for pat in self.cfg.lengths_in):
            for name in dataset.splits:
                if name.startswith(LENGTH_SPLIT) and name != split:
                    self._current = name
                    yield from dataset.eval_batches(name, batch_size)
        self._current = split
        yield from dataset.eval_batches(split, batch_size)
        if self.cfg.majority and "train" in dataset.splits and self.ctx is not None:
            counts = None
            for b in dataset.eval_batches("train", 4096):
                c = torch.bincount(b["label"].flatten(), minlength=1)
                counts = c if counts is None else _add_counts(counts, c)
            self.majority_label = int(counts.argmax())

    def reset(self) -> None:
        super().reset()
        self._current = ""

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
        if self._current.startswith(LENGTH_SPLIT) and self._current != getattr(self.ctx, "split", None):
            hits = self.length_hits.setdefault(self._current[len(LENGTH_SPLIT):], [0, 0])
            hits[0] += int((out["logits"].argmax(-1) == label).sum())
            hits[1] += n
            return
        self.main_length = int(batch["tokens"].shape[1])
        counts = torch.bincount(label.flatten().cpu(), minlength=1)
        self.label_counts = counts if self.label_counts is None else _add_counts(self.label_counts, counts)
        self.correct += int((out["logits"].argmax(-1) == label).sum())
        self.total += n
        for knockout in self._knockouts(model):
            logits = model.head.forward_detailed(batch, knockout=knockout)["logits"]
            self.knockout_hits[knockout] = self.knockout_hits.get(knockout, 0) + int((logits.argmax(-1) == label).sum())
        self._add("solver_iters", float(out["solver_iters"]), n)
        self._add("solver_residual", float(out["solver_residual"]), n)
        mem = out.get("memory")
        if mem is not None:
            diag = model.memory.diagnostics(mem, batch.get("read_target", label), batch.get("needle_pos"))
            for name in ("raw_read_cos", "clean_read_cos", "write_cos", "collision", "bucket_hit", "bucket_coverage"):
                if name in diag:
                    self._add(name, diag[name])
            self._add("read_gate", mem["read_gate"])
            self.winners.update(int(i) for i in diag["top1"].unique().tolist())
            self.n_prototypes = model.memory.n_prototypes

    def _knockouts(self, model) -> tuple[str, ...]:
        """The knock-outs to measure in this stage: none without an active memory."""
        stage = self.ctx.stage if self.ctx is not None else ""
        if not self.cfg.knockouts or not model.head.memory_active:
            return ()
        if not any(fnmatch.fnmatchcase(stage, pat) for pat in self.cfg.knockouts_in):
            return ()
        return self.cfg.knockouts

    def compute(self) -> dict[str, float]:
        acc = self.correct / max(self.total, 1)
        self.best = max(self.best, acc)
        out = {"acc": acc, "best_acc": self.best}
        for knockout, hits in self.knockout_hits.items():
            out[f"acc_without_{knockout}"] = hits / max(self.total, 1)
        if self.length_hits:
            out[f"acc@{self.main_length}"] = acc
            for length, (hit, total) in self.length_hits.items():
                out[f"acc@{length}"] = hit / max(total, 1)
        if self.majority_label is not None and self.label_counts is not None:
            counts = self.label_counts
            out["majority_acc"] = float(counts[self.majority_label]) / max(self.total, 1) if self.majority_label < len(counts) else 0.0
        out.update(self._schedule())
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

    def _schedule(self) -> dict[str, float]:
        sched = getattr(getattr(self.ctx, "objective", None), "scheduler", None)
        if sched is None or not hasattr(sched, "summary"):
            return {}
        opened = bool(sched.gate_open)
        best_pre = float(sched.best_pre_gate_acc)
        return {
            "memory/gate_opened": float(opened),
            "memory/gate_open_epoch": float(sched.open_epoch) if opened else 0.0,
            "memory/gate_open_fraction": float(sched.gate_open_fraction()),
            "memory/lambda": float(sched.current_lambda),
            "memory/post_gate_drop_epochs": float(sched.post_gate_drop_epochs),
            "memory/best_pre_gate_acc": best_pre if math.isfinite(best_pre) else 0.0,
        }


def _add_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n = max(len(a), len(b))
    return torch.nn.functional.pad(a, (0, n - len(a))) + torch.nn.functional.pad(b, (0, n - len(b)))
