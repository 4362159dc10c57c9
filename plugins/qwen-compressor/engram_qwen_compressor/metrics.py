"""Metrics: answer accuracy per mode and budget (with chance beside), collapse
diagnostics of the memory, and the seed's gradient check."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from engram_core.components import BuildContext, Metric
from engram_core.config import ConfigError, field, positive

from .data import check_budgets
from .objectives import _check_modes, answer_ce, oracle_target
from .reader import MODES


def _dataset_budgets(dataset, budgets):
    return list(budgets) if budgets else list(dataset.spec.budgets)


@attrs.frozen
class DigitAccuracyConfig:
    """Accuracy of the answer digit (argmax over the ten digit tokens) per mode and budget."""

    modes: list[str] = field(factory=lambda: ["discard", "summary", "latent", "oracle_kv"],
                             help=f"reader modes to evaluate: {', '.join(MODES)}")
    budgets: list[int] = field(factory=list, help="budgets (kept context tokens); [] = the data set's `budgets`")
    max_examples: int = field(512, help="evaluation episodes used (the first ones of the split)", validator=positive)
    breakdown: list[str] = field(factory=lambda: ["latent"], help="modes whose accuracy is also reported per target "
                                 "position (`acc_pos/<mode>_b<B>_p<i>`, i = statement index) and per number of removed "
                                 "statements (`acc_nrem/<mode>_n<k>`)")
    greedy: bool = field(False, help="also score every mode by greedy decoding through the reader: "
                                     "`greedy/<mode>_b<B>` is the exact match of the generated answer (argmax over the "
                                     "whole vocabulary, the answer being one token), `greedy_nondigit/<mode>_b<B>` the "
                                     "share of generations that are not a digit at all")
    mean_over_budgets: bool = field(False, help="also report `acc/<mode>_mean` (and `greedy/<mode>_mean`): the accuracy "
                                                "pooled over every budget (each budget has the same episodes), one number "
                                                "a `[select]` can choose by")


def greedy_answer(head, logits: torch.Tensor) -> torch.Tensor:
    """The answer the reader generates greedily, (B,) token ids: the argmax over its whole
    vocabulary at the answer position. The answer is one token (a digit), so greedy decoding
    of it is this one step; the reader was trained on nothing after the answer, so no
    continuation is asked of it."""
    return logits.argmax(-1)


class DigitAccuracy(Metric):
    """`acc/<mode>_b<budget>` for every mode × budget, and `acc/chance` (0.1) beside them;
    for the `breakdown` modes also per target position and per number of removed statements.

    `acc/*` is teacher-forced: the answer position's logits restricted to the ten digits,
    so a reader that would generate something else is still scored by its best digit.
    With `greedy = true`, `greedy/*` scores the answer the reader generates (exact match)."""

    directions = {"acc/*": "higher", "greedy/*": "higher", "greedy_nondigit/*": "lower"}
    groups = {"acc/chance": "reference"}
    references = {"acc/*": {"chance": "acc/chance"}, "greedy/*": {"chance": "acc/chance"}}

    def __init__(self, cfg: DigitAccuracyConfig, build: BuildContext):
        _check_modes(cfg.modes, build)
        for m in cfg.breakdown:
            if m not in cfg.modes:
                raise ConfigError("breakdown", f"mode {m!r} is not among the evaluated modes ({', '.join(cfg.modes)})")
        check_budgets(cfg.budgets, build.spec)
        self.cfg = cfg
        self.chance = build.spec.chance if build.spec is not None else 0.1
        self.add_state("correct", {}, dist_reduce_fx="sum")  # {tag: hits}, summed per key
        self.add_state("count", {}, dist_reduce_fx="sum")  # {tag: examples}

    def batches(self, dataset, split, batch_size):
        n = min(self.cfg.max_examples, dataset.num_examples(split))
        for budget in _dataset_budgets(dataset, self.cfg.budgets):
            for i in range(0, n, batch_size):
                yield dataset.make_batch(dataset.episodes(split, range(i, min(n, i + batch_size))), budget)

    def update(self, model, batch):
        budget = int(batch["budget"][0])
        for mode in self.cfg.modes:
            if mode == "latent" and not model.head.memory_active:
                continue  # memory knocked out (stage memory = false) or absent: no latent column
            logits = model.head.answer_logits(batch, mode)
            hits = (model.head.digit_logits(logits).argmax(-1) == batch["digit"]).float()
            self._add(f"acc/{mode}_b{budget}", hits)
            if self.cfg.mean_over_budgets:
                self._add(f"acc/{mode}_mean", hits)
            if self.cfg.greedy:
                generated = greedy_answer(model.head, logits)
                digits = torch.tensor(model.head.answer_token_ids, device=generated.device)
                exact = (generated == batch["answer"]).float()
                self._add(f"greedy/{mode}_b{budget}", exact)
                self._add(f"greedy_nondigit/{mode}_b{budget}", (~torch.isin(generated, digits)).float())
                if self.cfg.mean_over_budgets:
                    self._add(f"greedy/{mode}_mean", exact)
            if mode in self.cfg.breakdown and "target_pos" in batch:
                for group, name in ((batch["target_pos"], f"acc_pos/{mode}_b{budget}_p"), (batch["n_removed"], f"acc_nrem/{mode}_n")):
                    for v in group.unique().tolist():
                        self._add(f"{name}{int(v):02d}", hits[group == v])

    def _add(self, key: str, hits: torch.Tensor) -> None:
        self.correct[key] = self.correct.get(key, 0.0) + float(hits.sum())
        self.count[key] = self.count.get(key, 0) + int(hits.numel())

    def compute(self):
        out = {k: self.correct[k] / max(self.count[k], 1) for k in self.correct}
        out["acc/chance"] = float(self.chance)
        return out


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of (N, F) — Roy & Vetterli 2007.
    Uncentred on purpose: a constant memory has effective rank ~1."""
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum().clamp_min(1e-12)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@attrs.frozen
class CollapseConfig:
    """Collapse diagnostics of the memory over the first `max_examples` eval episodes."""

    budget: int = field(0, help="budget the memory input is cut at; 0 = the data set's training budget")
    max_examples: int = field(256, help="episodes used", validator=positive)


class Collapse(Metric):
    """The seed's conditioning check, in numbers:

    collapse/batch_cos        mean pairwise cosine of flattened memory across episodes (≈1: constant)
    collapse/consecutive_cos  cosine between the memories of consecutive episodes
    collapse/erank            effective rank of the (episodes × K·D) memory matrix
    collapse/rel_spread       mean across-episode std per coordinate / RMS of the memory
    collapse/centroid_acc     nearest-digit-centroid accuracy (first half fits, second half
                              tests): does the memory carry the answer digit at all?
    collapse/oracle_cos_digit, collapse/oracle_cos_kv   cosine of slot-pooled memory to each oracle target
    """

    directions = {"collapse/batch_cos": "lower", "collapse/consecutive_cos": "lower", "collapse/erank": "higher",
                  "collapse/rel_spread": "higher", "collapse/centroid_acc": "higher",
                  "collapse/oracle_cos_digit": "higher", "collapse/oracle_cos_kv": "higher"}
    references = {"collapse/centroid_acc": {"chance": 0.1}}  # ten digits

    def __init__(self, cfg: CollapseConfig, build: BuildContext):
        if cfg.budget:
            check_budgets([cfg.budget], build.spec, "budget")
        self.cfg = cfg
        for name in ("mem", "digits", "cos_digit", "cos_kv"):
            self.add_state(name, [], dist_reduce_fx="cat")  # one tensor per batch, in split order

    def batches(self, dataset, split, batch_size):
        n = min(self.cfg.max_examples, dataset.num_examples(split))
        budget = self.cfg.budget or dataset.spec.budget
        for i in range(0, n, batch_size):
            yield dataset.make_batch(dataset.episodes(split, range(i, min(n, i + batch_size))), budget)

    def update(self, model, batch):
        head = model.head
        if not head.memory_active:
            raise ConfigError("type", "the collapse metric needs an active memory (a [memory] table, stage memory = true)")
        prefix = head.write_memory(batch).float()
        self.mem.append(prefix.cpu())
        self.digits.append(batch["digit"].cpu())
        pooled = prefix.mean(1)
        if "gold_digit_ids" in batch:
            self.cos_digit.append(F.cosine_similarity(pooled, oracle_target(head, batch, "gold_digit"), dim=-1).cpu())
            self.cos_kv.append(F.cosine_similarity(pooled, oracle_target(head, batch, "gold_kv"), dim=-1).cpu())

    def compute(self):
        mem = torch.cat(self.mem)  # (N, K, D)
        digits = torch.cat(self.digits)
        flat = mem.flatten(1)
        z = F.normalize(flat, dim=-1)
        n = z.shape[0]
        sim = z @ z.t()
        out = {
            "collapse/batch_cos": float((sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)),
            "collapse/consecutive_cos": float((z[1:] * z[:-1]).sum(-1).mean()) if n > 1 else 1.0,
            "collapse/erank": effective_rank(flat),
            "collapse/rel_spread": float(flat.std(0).mean() / flat.pow(2).mean().sqrt().clamp_min(1e-12)),
        }
        half = n // 2
        fit_x, fit_y, test_x, test_y = flat[:half], digits[:half], flat[half:], digits[half:]
        present = [d for d in range(10) if bool((fit_y == d).any())]
        if present and len(test_y):
            cents = torch.stack([fit_x[fit_y == d].mean(0) for d in present])
            pred = torch.tensor(present)[torch.cdist(test_x, cents).argmin(1)]
            out["collapse/centroid_acc"] = float((pred == test_y).float().mean())
        if self.cos_digit:
            out["collapse/oracle_cos_digit"] = float(torch.cat(self.cos_digit).mean())
            out["collapse/oracle_cos_kv"] = float(torch.cat(self.cos_kv).mean())
        return out


@attrs.frozen
class GradCheckConfig:
    """The seed's gradient check: how much gradient of the answer CE reaches the encoder."""

    n_batches: int = field(2, help="eval batches the gradient is averaged over", validator=positive)
    mode: str = field("latent", help="reader mode whose answer CE is differentiated")


class GradCheck(Metric):
    """`debug/encoder_grad_norm` (memory parameters) and `debug/reader_grad_norm` (head
    parameters that currently train), of the answer CE; training gradients are left intact."""

    groups = {"debug/*": "debug"}  # gradient norms: diagnostics, no better direction

    needs_grad = True

    def __init__(self, cfg: GradCheckConfig, build: BuildContext):
        _check_modes([cfg.mode], build, "mode")
        self.cfg = cfg
        self.add_state("enc", 0.0, dist_reduce_fx="sum")  # gradient norms summed over batches
        self.add_state("rdr", 0.0, dist_reduce_fx="sum")
        self.add_state("n", 0, dist_reduce_fx="sum")

    def batches(self, dataset, split, batch_size):
        n = dataset.num_examples(split)
        for j in range(self.cfg.n_batches):
            lo = (j * batch_size) % n
            yield dataset.make_batch(dataset.episodes(split, range(lo, min(n, lo + batch_size))), dataset.spec.budget)

    def update(self, model, batch):
        params = [p for p in model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        ce, _, _ = answer_ce(model.head, batch, self.cfg.mode, digits_only=False)
        ce.backward()
        mem = model.memory
        enc = [p.grad for p in (mem.parameters() if mem is not None else []) if p.grad is not None]
        rdr = [p.grad for p in model.head.parameters() if p.grad is not None]
        self.enc += float(torch.sqrt(sum((g.float().pow(2).sum() for g in enc), torch.tensor(0.0))))
        self.rdr += float(torch.sqrt(sum((g.float().pow(2).sum() for g in rdr), torch.tensor(0.0))))
        self.n += 1
        for p, g in zip(params, saved):
            p.grad = g

    def compute(self):
        return {"debug/encoder_grad_norm": self.enc / max(self.n, 1), "debug/reader_grad_norm": self.rdr / max(self.n, 1)}


@attrs.frozen
class ValueMatchConfig:
    """Exact match of a multi-token answer (stdlib_assign's VALUE and the end of its line) per mode and budget."""

    modes: list[str] = field(factory=lambda: ["discard", "summary", "full", "latent"],
                             help=f"reader modes to evaluate: {', '.join(MODES)}")
    budgets: list[int] = field(factory=list, help="budgets (kept context tokens); [] = the data set's `budgets`")
    max_examples: int = field(256, help="evaluation episodes used (the first ones of the split)", validator=positive)
    mean_over_budgets: bool = field(False, help="also report `match/<mode>_mean` (pooled over every budget)")


class ValueMatch(Metric):
    """`match/<mode>_b<B>`: the reader generates greedily as many tokens as the answer has and
    every one is right (VALUE's digits, then the newline that ends the line: a longer number
    is wrong); `tf_match/*` the same teacher-forced (each token the argmax after the true
    ones), `token_acc/*` the share of right answer tokens teacher-forced; `match/chance`
    1 / (max_value + 1) beside them."""

    directions = {"match/*": "higher", "tf_match/*": "higher", "token_acc/*": "higher"}
    groups = {"match/chance": "reference"}
    references = {"match/*": {"chance": "match/chance"}}

    def __init__(self, cfg: ValueMatchConfig, build: BuildContext):
        _check_modes(cfg.modes, build)
        check_budgets(cfg.budgets, build.spec)
        self.cfg = cfg
        self.chance = build.spec.chance if build.spec is not None else 0.0
        self.add_state("correct", {}, dist_reduce_fx="sum")
        self.add_state("count", {}, dist_reduce_fx="sum")

    def batches(self, dataset, split, batch_size):
        n = min(self.cfg.max_examples, dataset.num_examples(split))
        for budget in _dataset_budgets(dataset, self.cfg.budgets):
            for i in range(0, n, batch_size):
                yield dataset.make_batch(dataset.episodes(split, range(i, min(n, i + batch_size))), budget)

    def update(self, model, batch):
        budget = int(batch["budget"][0])
        ids, mask = batch["answer_ids"], batch["answer_mask"].bool()
        for mode in self.cfg.modes:
            if mode == "latent" and not model.head.memory_active:
                continue
            generated = model.head.greedy_answer(batch, mode, ids.shape[1])
            exact = ((generated == ids) | ~mask).all(1).float()
            logits = model.head.answer_span_logits(batch, mode, ids.shape[1])
            tf = ((logits.argmax(-1) == ids) | ~mask).all(1).float()
            right = ((logits.argmax(-1) == ids) & mask).float().sum(1) / mask.float().sum(1)
            for tag, hits in (("match", exact), ("tf_match", tf), ("token_acc", right)):
                self._add(f"{tag}/{mode}_b{budget}", hits)
                if self.cfg.mean_over_budgets:
                    self._add(f"{tag}/{mode}_mean", hits)

    def _add(self, key: str, hits: torch.Tensor) -> None:
        self.correct[key] = self.correct.get(key, 0.0) + float(hits.sum())
        self.count[key] = self.count.get(key, 0) + int(hits.numel())

    def compute(self):
        out = {k: self.correct[k] / max(self.count[k], 1) for k in self.correct}
        out["match/chance"] = float(self.chance)
        return out
