"""Objectives of the compressor: answer CE through the reader, oracle-target cosine,
contrastive anti-collapse (supervised InfoNCE, positives by answer digit or, per slot,
by the digit of the statement the slot stands for), autoencoding (the frozen reader
regenerates the removed text from the memory, ICAE / 500xCompressor), a slot-target
warm start (slot j regresses onto the reader's embedding of removed statement j's
value digit), and a weighted combination of them (`compressor_loss`).
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from engram_core.components import BuildContext, Objective
from engram_core.config import ConfigError, field, non_negative, one_of, positive

from .data import check_budgets
from .reader import MODES, ORACLE_MODES

ORACLE_TARGETS = ("gold_digit", "gold_kv")


def _check_modes(modes, build: BuildContext, key: str = "modes") -> None:
    if not modes:
        raise ConfigError(key, "needs at least one mode")
    for m in modes:
        if m not in MODES:
            raise ConfigError(key, f"unknown mode {m!r}; modes: {', '.join(MODES)}")
        if m in ORACLE_MODES and build.spec is not None and not build.spec.gold_fields:
            raise ConfigError(key, f"mode {m!r} needs gold fields: set data.gold_fields = true")


def _check_budgets(budgets, build: BuildContext) -> None:
    check_budgets(budgets, build.spec)


def _sample(cfg, dataset, split, batch_size, generator):
    """A batch at a random one of `cfg.budgets` (else the data set's budget); with
    `overfit_one`, `batch_size` copies of the split's first episode (the seed's debug mode)."""
    budget = None
    if cfg.budgets:
        budget = cfg.budgets[int(torch.randint(0, len(cfg.budgets), (1,), generator=generator))]
    if getattr(cfg, "overfit_one", False):
        return dataset.make_batch(dataset.episodes(split, [0] * batch_size), budget or dataset.spec.budget)
    return dataset.sample(split, batch_size, generator, budget=budget)


def _check_target(target: str, build: BuildContext) -> None:
    if build.spec is not None and not build.spec.gold_fields:
        raise ConfigError("oracle_target", f"oracle target {target!r} needs gold fields: set data.gold_fields = true")


def answer_ce(head, batch: dict, mode: str, digits_only: bool):
    """(mean CE, accuracy over digits, prefix or None) of the answer token under `mode`."""
    logits, prefix = head.answer_logits(batch, mode, return_prefix=True)
    digit_logits = head.digit_logits(logits)
    if digits_only:
        ce = F.cross_entropy(digit_logits, batch["digit"])
    else:
        ce = F.cross_entropy(logits, batch["answer"])
    acc = (digit_logits.argmax(-1) == batch["digit"]).float().mean()
    return ce, acc, prefix


def text_ce(head, prefix, ids: torch.Tensor, mask: torch.Tensor, prefix_mask=None) -> torch.Tensor:
    """Next-token CE of `ids` (B, T, no BOS) read as `[BOS] prefix ids`: the logits after the
    last prefix vector predict ids[0], and so on (teacher forcing). prefix None: no prefix."""
    b = ids.shape[0]
    bos = ids.new_full((b, 1), head.bos_id)
    emb = head.embed(torch.cat([bos, ids], dim=1))
    m = torch.cat([mask.new_ones(b, 1), mask], dim=1)
    k = 0
    if prefix is not None:
        k = prefix.shape[1]
        pm = prefix_mask if prefix_mask is not None else mask.new_ones(b, k)
        emb = torch.cat([emb[:, :1], prefix.to(emb.dtype), emb[:, 1:]], dim=1)
        m = torch.cat([m[:, :1], pm.to(m.dtype), m[:, 1:]], dim=1)
    logits = head.run(emb, m)[:, k : k + ids.shape[1]]  # position k+j (BOS, K slots, ids[:j]) predicts ids[j]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1), reduction="none")
    w = mask.reshape(-1).to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def slot_targets(head, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets (B, S, D), valid (B, S)): the reader's embedding at the value digit of each
    wholly removed statement, in order: what slot j of a perfect memory would hold."""
    emb = head.embed(batch["removed_ids"])
    pos = batch["removed_value_pos"]
    rows = torch.arange(emb.shape[0], device=emb.device)[:, None].expand_as(pos)
    return emb[rows, pos].detach(), batch["removed_value_mask"].bool()


def slot_regression(prefix: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error of slot j against target j (relative to the targets' mean square),
    over the slots that have a statement; slots beyond the removed statements are free."""
    k = min(prefix.shape[1], targets.shape[1])
    p, t, v = prefix[:, :k], targets[:, :k], valid[:, :k].to(prefix.dtype)
    err = (p - t).pow(2).mean(-1)
    scale = t.pow(2).mean(-1).clamp_min(1e-6)
    return ((err / scale) * v).sum() / v.sum().clamp_min(1.0)


def slot_labels(batch: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (B, k), valid (B, k)): the value token of the removed statement slot j stands for."""
    pos = batch["removed_value_pos"][:, :k]
    valid = batch["removed_value_mask"][:, :k].bool()
    labels = batch["removed_ids"].gather(1, pos)
    if pos.shape[1] < k:
        pad = k - pos.shape[1]
        labels = F.pad(labels, (0, pad), value=-1)
        valid = F.pad(valid, (0, pad), value=False)
    return labels, valid


def oracle_target(head, batch: dict, target: str) -> torch.Tensor:
    """The reader-space vector the memory is pulled towards: the gold digit's token
    embedding, or the mean token embedding of the gold statement (template-dominated)."""
    if target == "gold_digit":
        if "gold_digit_ids" not in batch:
            raise ConfigError("oracle_target", "needs gold fields: set data.gold_fields = true")
        return head.embed(batch["gold_digit_ids"])[:, 0]
    if "gold_kv_ids" not in batch:
        raise ConfigError("oracle_target", "needs gold fields: set data.gold_fields = true")
    emb = head.embed(batch["gold_kv_ids"])
    m = batch["gold_kv_mask"].to(emb.dtype)[..., None]
    return (emb * m).sum(1) / m.sum(1).clamp_min(1.0)


def oracle_cosine(prefix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine between the slot-pooled memory and the (detached) oracle target."""
    return F.cosine_similarity(prefix.mean(1), target.detach(), dim=-1).mean()


def supervised_info_nce(vectors: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """SupCon / InfoNCE over the batch: each item's positives are the other items with the
    same label; items with no positive are skipped. Zero when no item has a positive."""
    z = F.normalize(vectors.flatten(1), dim=-1)
    sim = z @ z.t() / temperature
    n = z.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(1)
    has = n_pos > 0
    if not bool(has.any()):
        return vectors.sum() * 0.0
    per_item = -(log_prob.masked_fill(~pos, 0.0).sum(1)[has] / n_pos[has])
    return per_item.mean()


@attrs.frozen
class AnswerCEConfig:
    """Cross-entropy of the answer digit through the reader, averaged over `modes`."""

    modes: list[str] = field(factory=lambda: ["latent"], help=f"reader input modes, each a forward pass: {', '.join(MODES)}")
    digits_only: bool = field(False, help="softmax over the ten digit tokens only (else over the whole vocabulary)")
    budgets: list[int] = field(factory=list, help="draw each batch at a random one of these budgets; [] = data.budget")


class _ModesObjective(Objective):
    """An answer objective over `cfg.modes`, its batches drawn at `cfg.budgets` (AnswerCE, ValueCE)."""

    def __init__(self, cfg, build: BuildContext):
        super().__init__()
        _check_modes(cfg.modes, build)
        _check_budgets(cfg.budgets, build)
        self.cfg = cfg

    def sample(self, dataset, split, batch_size, generator):
        return _sample(self.cfg, dataset, split, batch_size, generator)


class AnswerCE(_ModesObjective):
    """Answer CE; `modes = ["full", "summary"]` pretrains the reader, `["latent"]` trains the memory."""

    def forward(self, model, batch):
        total, terms = 0.0, {}
        for mode in self.cfg.modes:
            ce, acc, _ = answer_ce(model.head, batch, mode, self.cfg.digits_only)
            total = total + ce
            terms[f"ce_{mode}"] = ce.detach()
            terms[f"acc_{mode}"] = acc.detach()
        return total / len(self.cfg.modes), terms


@attrs.frozen
class CompressorLossConfig:
    """Weighted sum of answer CE, oracle-target cosine and contrastive terms on `mode`'s memory."""

    mode: str = field("latent", help="reader mode the terms are computed in (memory terms need 'latent')", validator=one_of(*MODES))
    ce_weight: float = field(1.0, help="weight of the answer cross-entropy", validator=non_negative)
    cosine_weight: float = field(0.0, help="weight of (1 - cos(memory, oracle target))", validator=non_negative)
    oracle_target: str = field("gold_digit", help="'gold_digit' (digit embedding) or 'gold_kv' (mean statement embedding)",
                               validator=one_of(*ORACLE_TARGETS))
    contrastive_weight: float = field(0.0, help="weight of the supervised InfoNCE on memory vectors", validator=non_negative)
    contrastive_by: str = field("answer", help="'answer': whole memories, positives share the answer digit (the seed's); "
                                               "'slot': each slot, positives share the digit of the removed statement it stands for",
                                validator=one_of("answer", "slot"))
    temperature: float = field(0.1, help="InfoNCE temperature", validator=positive)
    ae_weight: float = field(0.0, help="weight of autoencoding: next-token CE of the removed text read by the reader "
                                       "from [BOS] memory (ICAE / 500xCompressor pretraining)", validator=non_negative)
    slot_weight: float = field(0.0, help="weight of the slot-target warm start: slot j regresses onto the reader's "
                                         "embedding of removed statement j's value digit (MSE / target power); needs "
                                         "the generator's value positions (`removed_value_pos`)",
                               validator=non_negative)
    digits_only: bool = field(False, help="answer CE over the ten digit tokens only")
    budgets: list[int] = field(factory=list, help="draw each batch at a random one of these budgets; [] = data.budget")
    overfit_one: bool = field(False, help="debug (overfit-one): every batch is the split's first episode, repeated")

    def __attrs_post_init__(self):
        weights = (self.ce_weight, self.cosine_weight, self.contrastive_weight, self.ae_weight, self.slot_weight)
        if sum(weights) <= 0:
            raise ConfigError("ce_weight", "at least one of ce_weight, cosine_weight, contrastive_weight, ae_weight, "
                                           "slot_weight must be > 0")
        if sum(weights[1:]) and self.mode != "latent":
            raise ConfigError("mode", f"memory terms act on learned memory: mode must be 'latent', got {self.mode!r}")


class CompressorLoss(Objective):
    """`ce_weight·CE + cosine_weight·(1 − cos(memory, target)) + contrastive_weight·InfoNCE
    + ae_weight·AE + slot_weight·slot MSE`.

    Logged: `train/ce`, `train/acc` (when ce_weight > 0), `train/oracle_cos`, `train/info_nce`
    (also at weight 0, as diagnostics), `train/ae_ce`, `train/slot_mse` (when weighted).
    """

    def __init__(self, cfg: CompressorLossConfig, build: BuildContext):
        super().__init__()
        _check_modes([cfg.mode], build, "mode")
        if cfg.cosine_weight > 0:
            _check_target(cfg.oracle_target, build)
        _check_budgets(cfg.budgets, build)
        self.cfg = cfg

    def sample(self, dataset, split, batch_size, generator):
        return _sample(self.cfg, dataset, split, batch_size, generator)

    def forward(self, model, batch):
        c = self.cfg
        head = model.head
        loss, terms = 0.0, {}
        if c.ce_weight > 0 or c.mode != "latent":
            ce, acc, prefix = answer_ce(head, batch, c.mode, c.digits_only)
            loss = c.ce_weight * ce
            terms.update(ce=ce.detach(), acc=acc.detach())
        else:  # a memory-only stage (autoencoding, warm start): no answer pass
            prefix = head.write_memory(batch)
        if prefix is not None and c.mode == "latent":
            gold_key = "gold_digit_ids" if c.oracle_target == "gold_digit" else "gold_kv_ids"
            if c.cosine_weight > 0 or gold_key in batch:  # logged as a diagnostic whenever gold fields exist
                cos = oracle_cosine(prefix, oracle_target(head, batch, c.oracle_target))
                terms["oracle_cos"] = cos.detach()
                if c.cosine_weight > 0:
                    loss = loss + c.cosine_weight * (1.0 - cos)
            if c.contrastive_by == "slot":
                labels, valid = slot_labels(batch, prefix.shape[1])
                nce = supervised_info_nce(prefix.reshape(-1, prefix.shape[-1])[valid.reshape(-1)],
                                          labels.reshape(-1)[valid.reshape(-1)], c.temperature)
            else:
                nce = supervised_info_nce(prefix, batch["digit"], c.temperature)
            terms["info_nce"] = nce.detach()
            if c.contrastive_weight > 0:
                loss = loss + c.contrastive_weight * nce
            if c.ae_weight > 0:
                ae = text_ce(head, prefix, batch["removed_ids"], batch["removed_mask"])
                terms["ae_ce"] = ae.detach()
                loss = loss + c.ae_weight * ae
            if c.slot_weight > 0:
                mse = slot_regression(prefix, *slot_targets(head, batch))
                terms["slot_mse"] = mse.detach()
                loss = loss + c.slot_weight * mse
        return loss, terms


@attrs.frozen
class OracleCosineConfig:
    """Only the oracle-target cosine (the seed's "oracle target" training)."""

    oracle_target: str = field("gold_digit", help="'gold_digit' or 'gold_kv' (reproduces the template false positive)",
                               validator=one_of(*ORACLE_TARGETS))


class OracleCosine(Objective):
    """`1 − cos(mean-pooled memory, oracle target)`; also logs the answer accuracy it gives."""

    def __init__(self, cfg: OracleCosineConfig, build: BuildContext):
        super().__init__()
        _check_target(cfg.oracle_target, build)
        self.cfg = cfg

    def forward(self, model, batch):
        logits, prefix = model.head.answer_logits(batch, "latent", return_prefix=True)
        cos = oracle_cosine(prefix, oracle_target(model.head, batch, self.cfg.oracle_target))
        acc = (model.head.digit_logits(logits).argmax(-1) == batch["digit"]).float().mean()
        return 1.0 - cos, {"oracle_cos": cos.detach(), "acc": acc.detach()}


@attrs.frozen
class ContrastiveConfig:
    """Only the supervised InfoNCE on memory vectors (positives: same answer digit)."""

    temperature: float = field(0.1, help="InfoNCE temperature", validator=positive)


class Contrastive(Objective):
    def __init__(self, cfg: ContrastiveConfig, build: BuildContext):
        super().__init__()
        self.cfg = cfg

    def forward(self, model, batch):
        head = model.head
        if not head.memory_active:
            raise ConfigError("type", "the contrastive objective needs a memory table")
        prefix = head.write_memory(batch)
        nce = supervised_info_nce(prefix, batch["digit"], self.cfg.temperature)
        return nce, {"info_nce": nce.detach()}


# ---- stdlib_assign: a multi-token answer (VALUE and the end of its line) ----------------------


def value_ce(head, batch: dict, mode: str):
    """(mean CE over the answer tokens, teacher-forced token accuracy, teacher-forced exact
    match, prefix or None) of a multi-token answer (`answer_ids / answer_mask`) under `mode`."""
    ids, mask = batch["answer_ids"], batch["answer_mask"].bool()
    logits, prefix = head.answer_span_logits(batch, mode, ids.shape[1], return_prefix=True)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids.reshape(-1), reduction="none").view_as(ids)
    w = mask.to(ce.dtype)
    right = logits.argmax(-1) == ids
    token_acc = (right.to(ce.dtype) * w).sum() / w.sum().clamp_min(1.0)
    exact = (right | ~mask).all(1).to(ce.dtype).mean()
    return (ce * w).sum() / w.sum().clamp_min(1.0), token_acc, exact, prefix


@attrs.frozen
class ValueCEConfig:
    """Teacher-forced CE of every answer token (VALUE's, then the newline), averaged over `modes`."""

    modes: list[str] = field(factory=lambda: ["latent"], help=f"reader input modes, each a forward pass: {', '.join(MODES)}")
    budgets: list[int] = field(factory=list, help="draw each batch at a random one of these budgets; [] = data.budget")


class ValueCE(_ModesObjective):
    """Answer CE for `stdlib_assign`; logs `ce_<mode>`, `token_acc_<mode>`, `exact_<mode>` (teacher-forced)."""

    def forward(self, model, batch):
        total, terms = 0.0, {}
        for mode in self.cfg.modes:
            ce, token_acc, exact, _ = value_ce(model.head, batch, mode)
            total = total + ce
            terms.update({f"ce_{mode}": ce.detach(), f"token_acc_{mode}": token_acc.detach(), f"exact_{mode}": exact.detach()})
        return total / len(self.cfg.modes), terms
