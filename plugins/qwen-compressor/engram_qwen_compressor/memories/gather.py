"""`gather`: the parameter-free baseline of the slot-target warm start.

Slot j is the frozen reader's own embedding (token shift included, run over the removed
text as when it was read) of the removed token at position `offset + stride·j`: with the
seed's rigid template (`KEY05 = 8\\n`, byte tokens) statement j's value digit sits at
8 + 10j, so this gathers exactly the vectors the `warm_start` objective regresses slot j
onto (the `oracle_slots` prefix) — without training and without the generator's labels,
only the template's two constants. Slots whose position lies past the removed segment are
masked out of the reader's attention (`context_mask`), as `oracle_slots` masks them.

No parameters: what a learned compressor trained towards these targets must beat. It
knows nothing a template does not say: with mixed templates (`data.template_diversity`)
the value digits are elsewhere and it gathers other tokens.
"""

from __future__ import annotations

import attrs
import torch

from engram_core.components import BuildContext, Memory
from engram_core.config import ConfigError, field, non_negative, positive

from .base import ContextPointMixin, MemoryStatsMixin


@attrs.frozen
class GatherConfig:
    """Slots = the reader's embeddings at fixed positions of the removed text (no parameters)."""

    n_slots: int = field(16, help="K, positions gathered (the prefix length)", validator=positive)
    offset: int = field(8, help="position of the first value token in the removed text (8: the rigid byte template "
                                "`KEY05 = 8\\n`)", validator=non_negative)
    stride: int = field(10, help="tokens from one statement's value to the next (10: the rigid byte template)",
                        validator=positive)


class Gather(ContextPointMixin, MemoryStatsMixin, Memory):
    """(B, T) removed tokens → (B, K, D): the reader's embeddings at `offset + stride·j`."""

    independent_batch_items = True

    def __init__(self, cfg: GatherConfig, build: BuildContext):
        super().__init__()
        head = build.head
        if head is None or not hasattr(head, "embed"):
            raise ConfigError("type", "gather needs the qwen-compressor `reader` head (it embeds the removed tokens)")
        self.cfg = cfg
        object.__setattr__(self, "reader", head)  # shared, not a child: the reader's weights stay head.*
        self.out_width = head.width
        self.last_output = None
        self._snapshot()

    def positions(self, removed_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (B, K) clamped into the segment, valid (B, K): inside the removed tokens)."""
        pos = self.cfg.offset + self.cfg.stride * torch.arange(self.cfg.n_slots, device=removed_mask.device)
        length = removed_mask.sum(1, keepdim=True)  # right-padded: the removed tokens come first
        valid = pos[None] < length
        return pos[None].clamp(max=removed_mask.shape[1] - 1).expand_as(valid), valid

    def context_mask(self, removed_ids: torch.Tensor, removed_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K) 1 where slot j's position is inside the removed segment: the reader attends only those."""
        if removed_mask is None:
            removed_mask = torch.ones_like(removed_ids)
        return self.positions(removed_mask)[1].to(removed_mask.dtype)

    def forward(self, removed_ids: torch.Tensor, removed_mask: torch.Tensor | None = None) -> torch.Tensor:
        if removed_mask is None:
            removed_mask = torch.ones_like(removed_ids)
        pos, valid = self.positions(removed_mask)
        emb = self.reader.embed(removed_ids)
        rows = torch.arange(emb.shape[0], device=emb.device)[:, None].expand_as(pos)
        out = emb[rows, pos] * valid[..., None].to(emb.dtype)  # masked slots are zero (and not attended)
        self.last_output = out.detach()
        return out
