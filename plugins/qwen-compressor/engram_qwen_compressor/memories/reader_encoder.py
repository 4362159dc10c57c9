"""`reader_encoder`: the reader itself writes the memory (ICAE / xRAG / 500xCompressor).

The removed tokens + K learned memory-token embeddings go through the reader with its own
LoRA adapter `encoder` switched on; the last hidden states at the K memory tokens,
projected, are the memory.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from engram_core.components import BuildContext, Memory
from engram_core.config import ConfigError, field, non_negative, positive

from .base import ContextPointMixin, MemoryStatsMixin, reader_width


@attrs.frozen
class ReaderEncoderConfig:
    """The reader itself, with its own LoRA adapter, writes the K memory vectors."""

    n_slots: int = field(8, help="K, the number of memory tokens (prefix length)", validator=positive)
    lora_rank: int = field(8, help="rank of the encoder-only LoRA adapter added to the reader", validator=positive)
    lora_alpha: float = field(16.0, help="LoRA scale numerator", validator=positive)
    out_dim: int = field(0, help="0 = the reader's width (the only width allowed)", validator=non_negative)
    output_norm: bool = field(True, help="LayerNorm on the projected memory")


class ReaderEncoder(ContextPointMixin, MemoryStatsMixin, Memory):
    """ICAE-style: [BOS] removed tokens [M1..MK] through the reader (adapter `encoder` on),
    memory = proj(hidden states at M1..MK). The reader's weights are shared, not copied:
    the adapter's parameters live in the head (``head.lm.….lora.encoder.*``)."""

    independent_batch_items = True

    def __init__(self, cfg: ReaderEncoderConfig, build: BuildContext):
        super().__init__()
        head = build.head
        if head is None or not hasattr(head, "add_adapter") or getattr(head, "_peft", False):
            raise ConfigError("type", "reader_encoder needs the qwen-compressor `reader` head with builtin LoRA "
                                      "(head.lora_impl = 'builtin' or 'auto' on backend 'core')")
        self.cfg = cfg
        self.out_width = reader_width(build, cfg.out_dim)
        object.__setattr__(self, "reader", head)  # shared, not a child module: parameters stay head.*
        head.add_adapter("encoder", cfg.lora_rank, cfg.lora_alpha)
        self.bos_id = build.spec.bos_id
        self.slots = nn.Parameter(torch.randn(1, cfg.n_slots, self.out_width) * 0.02)
        self.proj = nn.Linear(self.out_width, self.out_width)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(self.out_width))
            self.proj.bias.zero_()
        self.out_norm = nn.LayerNorm(self.out_width) if cfg.output_norm else nn.Identity()
        self.last_output = None
        self._snapshot()

    def forward(self, removed_ids: torch.Tensor, removed_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = removed_ids.shape
        if removed_mask is None:
            removed_mask = torch.ones_like(removed_ids)
        lengths = removed_mask.sum(1)
        ids = torch.cat([removed_ids.new_full((b, 1), self.bos_id), removed_ids], dim=1)
        with self.reader.adapters.only(("encoder",)):
            emb = self.reader.embed(ids)
            # memory tokens right after each item's last real token (packed, no gap)
            k = self.cfg.n_slots
            seq = torch.cat([emb, emb.new_zeros(b, k, emb.shape[-1])], dim=1)
            mask = torch.cat([torch.cat([removed_mask.new_ones(b, 1), removed_mask], 1), removed_mask.new_zeros(b, k)], 1)
            slot_pos = (lengths + 1)[:, None] + torch.arange(k, device=ids.device)[None]  # (B, K)
            rows = torch.arange(b, device=ids.device)[:, None].expand(b, k)
            seq = seq.index_put((rows, slot_pos), self.slots.expand(b, -1, -1).to(seq.dtype))
            mask = mask.index_put((rows, slot_pos), mask.new_ones(b, k))
            _, hidden = self.reader.run(seq, mask, hidden=True)
        out = self.out_norm(self.proj(hidden[rows, slot_pos]))
        self.last_output = out.detach()
        return out
