"""Cross-entropy on completion tokens only."""

from __future__ import annotations

import attrs
import torch.nn.functional as F

from engram_core.components import BuildContext, Objective


@attrs.frozen
class CompletionCEConfig:
    """No keys: the labels of the batch (-100 outside the completion) say what counts."""


class CompletionCE(Objective):
    """Mean next-token cross-entropy over completion tokens (and their EOS) only; the
    prompt is context, not target."""

    def __init__(self, cfg: CompletionCEConfig, build: BuildContext):
        super().__init__()

    def forward(self, model, batch):
        logits = model.head(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        with_target = labels != -100
        acc = (logits[:, :-1].argmax(-1) == labels)[with_target].float().mean()
        return loss, {"ce": loss.detach(), "token_acc": acc.detach()}
