"""`token_select`: keep k of the removed tokens, picked by a learned scorer, and hand them
to the reader *as tokens* (the seed's second pivot: use the model's native interface).

A small bidirectional encoder scores every removed token; the k best (in their original
order) are embedded by the reader's own embedding (token shift included, over the kept
sequence of k tokens) and become the prefix, so the budget is the same as K = k latent
slots. The choice is discrete; the scorer learns through a straight-through gate: each
kept token's embedding is multiplied by `1 + s − stop_grad(s)` (s = sigmoid(score)),
which is 1 in the forward pass and passes ∂loss/∂s = <∂loss/∂embedding, embedding> back.
Training adds Gumbel noise to the scores (`noise`) so tokens that are not yet picked get
tried and scored too.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from engram_core.components import BuildContext, Memory
from engram_core.config import ConfigError, field, non_negative, positive

from .base import ContextPointMixin, MemoryStatsMixin


@attrs.frozen
class TokenSelectConfig:
    """A learned scorer keeps k removed tokens; the reader reads them as tokens."""

    n_slots: int = field(8, help="k, tokens kept (the prefix length, as K latent slots)", validator=positive)
    dim: int = field(64, help="scorer width", validator=positive)
    n_heads: int = field(4, help="scorer attention heads (must divide dim)", validator=positive)
    n_layers: int = field(2, help="bidirectional self-attention layers of the scorer", validator=non_negative)
    max_len: int = field(512, help="longest removed segment (learned positions)", validator=positive)
    noise: float = field(1.0, help="scale of the Gumbel noise added to the scores while training (0 = none)",
                         validator=non_negative)

    def __attrs_post_init__(self):
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")


class TokenSelect(ContextPointMixin, MemoryStatsMixin, Memory):
    """Scores (B, T) over the removed tokens → the k best as reader token embeddings (B, k, D)."""

    independent_batch_items = True

    def __init__(self, cfg: TokenSelectConfig, build: BuildContext):
        super().__init__()
        head = build.head
        if head is None or not hasattr(head, "embed"):
            raise ConfigError("type", "token_select needs the qwen-compressor `reader` head (it embeds the kept tokens)")
        self.cfg = cfg
        object.__setattr__(self, "reader", head)  # shared, not a child: the reader's weights stay head.*
        self.out_width = head.width
        vocab = build.spec.vocab_size
        self.tok = nn.Embedding(vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.dim, cfg.n_heads, 4 * cfg.dim, 0.0, batch_first=True, norm_first=True)
            for _ in range(cfg.n_layers)
        )
        self.score = nn.Linear(cfg.dim, 1)
        self.pad_id = build.spec.pad_id
        self.last_output = None
        self.last_selected: torch.Tensor | None = None
        self._snapshot()

    def scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.cfg.max_len:
            raise ConfigError("max_len", f"a removed segment of {t} tokens exceeds memory.max_len {self.cfg.max_len}")
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))[None]
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=mask == 0)
        return self.score(x).squeeze(-1).masked_fill(mask == 0, float("-inf"))

    def forward(self, removed_ids: torch.Tensor, removed_mask: torch.Tensor | None = None) -> torch.Tensor:
        if removed_mask is None:
            removed_mask = torch.ones_like(removed_ids)
        b, t = removed_ids.shape
        k = self.cfg.n_slots
        if t < k:  # a short segment: pad it so k positions exist (padding is never picked before real tokens)
            removed_ids = torch.cat([removed_ids, removed_ids.new_full((b, k - t), self.pad_id)], 1)
            removed_mask = torch.cat([removed_mask, removed_mask.new_zeros(b, k - t)], 1)
        s = self.scores(removed_ids, removed_mask)
        pick = s
        if self.training and self.cfg.noise > 0:
            u = torch.rand_like(s).clamp(1e-6, 1 - 1e-6)
            pick = s + self.cfg.noise * -torch.log(-torch.log(u))
        pick = pick.masked_fill(removed_mask == 0, -1e9)  # padding only when nothing else is left
        idx = pick.topk(k, dim=1).indices.sort(dim=1).values  # (B, k), original order
        chosen = removed_ids.gather(1, idx)
        real = removed_mask.gather(1, idx)
        self.last_selected = chosen.detach()
        emb = self.reader.embed(chosen)
        gate = torch.sigmoid(s.gather(1, idx).masked_fill(real == 0, 0.0))
        out = emb * (1.0 + gate - gate.detach())[..., None] * real[..., None].to(emb.dtype)
        self.last_output = out.detach()
        return out
