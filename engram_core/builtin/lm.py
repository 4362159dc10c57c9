"""Token-level LM loss and teacher-forced completion accuracy for sequence heads.

Both read a batch in completion format: ``input_ids`` and ``labels`` (the token at each
scored position, -100 elsewhere; the logits at t predict labels[t + 1]). A head with
``scored_logits(batch) -> (logits (B, K, vocab), targets (B, K), view)`` (the core
`causal_backbone`) projects only the scored positions onto the vocabulary (mqar scores 4
of 64); a head with ``forward_batch(batch) -> (logits, view)`` is given the whole batch, so
it can take write/read masks from it or turn a classification batch into a completion;
any other causal LM head is called as ``head(input_ids, attention_mask)``. Either way the
loss and accuracy are the same: positions with target -100 count nowhere.

Neither reads a device value on the host in the training step: the objective's terms stay
tensors on the device (the engine reads them at log steps).
"""

from __future__ import annotations

import time

import attrs
import torch
import torch.nn.functional as F

from ..components import BuildContext, Metric, Objective, model_device


def logits_and_labels(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (B, L, vocab), labels (B, L)) over every position."""
    head = model.head
    if hasattr(head, "forward_batch"):
        logits, view = head.forward_batch(batch)
        return logits, view["labels"]
    return head(batch["input_ids"], batch.get("attention_mask")), batch["labels"]


def scored_logits_and_targets(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (B, K, vocab), targets (B, K), input labels (B, L)): the logits whose target
    is scored (targets -100 elsewhere). Only where the head offers ``scored_logits`` are the
    other positions never computed; otherwise K = L - 1, every position."""
    head = model.head
    if hasattr(head, "scored_logits"):
        logits, targets, view = head.scored_logits(batch)
        return logits, targets, view["labels"]
    logits, labels = logits_and_labels(model, batch)
    return logits[:, :-1], labels[:, 1:], labels


@attrs.frozen
class TokenLMConfig:
    """No keys: the batch's labels (-100 = not scored) say which tokens count."""


class TokenLMObjective(Objective):
    """Mean next-token cross-entropy over the scored tokens; terms ``ce`` and ``token_acc``."""

    def __init__(self, cfg: TokenLMConfig, build: BuildContext):
        super().__init__()

    def forward(self, model, batch):
        logits, target, _ = scored_logits_and_targets(model, batch)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)
        # a sum over a count, on the device (boolean-mask indexing would wait for the host); an
        # argmax is never -100, so unscored targets cannot count as hits
        hits = (logits.argmax(-1) == target).sum()
        acc = hits / (target != -100).sum()
        return loss, {"ce": loss.detach(), "token_acc": acc.detach()}


@attrs.frozen
class CompletionAccuracyConfig:
    """Teacher-forced accuracy of the scored tokens, the model's size and its eval speed."""


class CompletionAccuracy(Metric):
    """``acc``: share of scored tokens predicted exactly (argmax, teacher-forced; for mqar
    one per query, for a one-token completion the classification accuracy); ``seq_acc``:
    share of sequences with every scored token right; ``params``: trainable and frozen
    parameters of head and memory; ``tokens_per_s``: input tokens per second of the
    evaluation forward passes (no gradient); ``state_size``, where the head can say it
    (`causal_backbone.state_size`): numbers one sequence carries from position to position
    at inference, at the evaluated length (Zoology's state size)."""

    directions = {"acc": "higher", "seq_acc": "higher", "tokens_per_s": "higher", "params": "lower", "state_size": "lower"}
    groups = {"params": "cost", "tokens_per_s": "cost", "state_size": "cost"}
    # mqar: a query's value is one of vocab_size - vocab_size // 2 tokens, so guessing scores 1/that
    references = {"acc": {"chance": lambda recipe: 1 / (recipe["data"]["vocab_size"] - recipe["data"]["vocab_size"] // 2)
                          if recipe["data"]["type"].split(":")[-1] == "mqar" else None}}

    def __init__(self, cfg: CompletionAccuracyConfig, build: BuildContext):
        self.cfg = cfg
        for name in ("hits", "count", "seq_hits", "seqs", "tokens"):
            self.add_state(name, 0, dist_reduce_fx="sum")  # counts (hits ... seqs become device tensors)
        self.add_state("seconds", 0.0, dist_reduce_fx="sum")  # tokens_per_s: all tokens over all ranks' time

    def update(self, model, batch):
        dev = model_device(model)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda *a: None)
        sync()
        t = time.perf_counter()
        logits, target, labels = scored_logits_and_targets(model, batch)
        sync()
        self.seconds += time.perf_counter() - t
        self.tokens += labels.numel()
        scored = target != -100
        right = (logits.argmax(-1) == target) & scored
        # counts stay on the device until compute()
        self.hits = self.hits + right.sum()
        self.count = self.count + scored.sum()
        self.seq_hits = self.seq_hits + ((right | ~scored).all(1) & scored.any(1)).sum()
        self.seqs = self.seqs + scored.any(1).sum()
        self._params = sum(p.numel() for p in model.parameters())
        state_size = getattr(model.head, "state_size", None)
        self._state = state_size(labels.shape[1]) if callable(state_size) else None

    def compute(self):
        hits, count, seq_hits, seqs = (int(v) for v in (self.hits, self.count, self.seq_hits, self.seqs))
        out = {
            "acc": hits / max(count, 1),
            "seq_acc": seq_hits / max(seqs, 1),
            "params": float(getattr(self, "_params", 0)),
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
        }
        if getattr(self, "_state", None) is not None:
            out["state_size"] = float(self._state)
        return out
