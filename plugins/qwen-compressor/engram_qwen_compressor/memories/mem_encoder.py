"""`mem_encoder`: a small Perceiver-style encoder of the removed tokens into K latent vectors.

Token + position embeddings, a few self-attention layers over the removed tokens, then K
learned queries that cross-attend to them (with latent self-attention and an MLP),
projected to the reader's width; the reader reads them as a prefix.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from engram_core.components import BuildContext, Memory
from engram_core.config import ConfigError, field, non_negative, positive

from .base import ContextPointMixin, MemoryStatsMixin, reader_width


@attrs.frozen
class MemEncoderConfig:
    """Perceiver-style compressor of the removed tokens into K prefix vectors."""

    n_slots: int = field(8, help="K, the number of memory vectors (prefix length)", validator=positive)
    dim: int = field(64, help="encoder width", validator=positive)
    n_heads: int = field(4, help="attention heads (must divide dim)", validator=positive)
    n_self_layers: int = field(1, help="self-attention layers over the removed tokens", validator=non_negative)
    n_cross_layers: int = field(2, help="cross-attention layers of the K queries onto the tokens", validator=positive)
    max_len: int = field(512, help="longest removed segment (learned positions)", validator=positive)
    vocab_size: int = field(0, help="token vocabulary; 0 = the data set's", validator=non_negative)
    out_dim: int = field(0, help="projection width; 0 = the reader's embedding width (must match it)", validator=non_negative)
    output_norm: bool = field(True, help="LayerNorm on the projected memory (keeps its scale like a token embedding's)")
    dropout: float = field(0.0, help="dropout in attention and MLPs", validator=non_negative)
    token_shift: int = field(0, help="add the previous 1..n token embeddings through fixed random rotations to each "
                                     "token (as the reader's token_shift): a statement's digit then carries its key locally",
                             validator=non_negative)
    query_aware: bool = field(False, help="also show the encoder the question (a question-aware compressor, "
                                           "a departure from the seed's query-agnostic one)")

    def __attrs_post_init__(self):
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")


class _CrossBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln_s = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln_m = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q, tokens, pad_mask):
        kv = self.ln_kv(tokens)
        q = q + self.cross(self.ln_q(q), kv, kv, key_padding_mask=pad_mask, need_weights=False)[0]
        s = self.ln_s(q)
        q = q + self.self_attn(s, s, s, need_weights=False)[0]
        return q + self.mlp(self.ln_m(q))


class MemEncoder(ContextPointMixin, MemoryStatsMixin, Memory):
    """K learned queries cross-attend to the removed tokens; output (B, K, reader width).

    A learned null token is always attendable, so an empty removed segment is well defined.
    """

    independent_batch_items = True

    def __init__(self, cfg: MemEncoderConfig, build: BuildContext):
        super().__init__()
        self.cfg = cfg
        vocab = cfg.vocab_size or (build.spec.vocab_size if build.spec is not None else 0)
        if vocab <= 0:
            raise ConfigError("vocab_size", "no data set to take the vocabulary from: set vocab_size")
        self.out_width = reader_width(build, cfg.out_dim)
        self.tok = nn.Embedding(vocab, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.null = nn.Parameter(torch.randn(1, 1, cfg.dim) * 0.02)
        self.segment = nn.Embedding(2, cfg.dim) if cfg.query_aware else None  # removed vs question tokens
        rot = [nn.init.orthogonal_(torch.empty(cfg.dim, cfg.dim)) for _ in range(cfg.token_shift)]
        self.register_buffer("shift", torch.stack(rot) if rot else torch.zeros(0, cfg.dim, cfg.dim))
        self.self_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.dim, cfg.n_heads, 4 * cfg.dim, cfg.dropout, batch_first=True, norm_first=True)
            for _ in range(cfg.n_self_layers)
        )
        self.queries = nn.Parameter(torch.randn(1, cfg.n_slots, cfg.dim) * 0.02)
        self.cross_layers = nn.ModuleList(_CrossBlock(cfg.dim, cfg.n_heads, cfg.dropout) for _ in range(cfg.n_cross_layers))
        self.ln_out = nn.LayerNorm(cfg.dim)
        self.proj = nn.Linear(cfg.dim, self.out_width)
        self.out_norm = nn.LayerNorm(self.out_width) if cfg.output_norm else nn.Identity()
        self.last_output: torch.Tensor | None = None
        self._snapshot()

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.tok(ids)
        out = e
        for i in range(1, min(self.shift.shape[0], e.shape[1] - 1) + 1):
            prev = torch.cat([e.new_zeros(e.shape[0], i, e.shape[2]), e[:, :-i]], dim=1)
            out = out + prev @ self.shift[i - 1].t()
        return out

    def forward(self, removed_ids: torch.Tensor, removed_mask: torch.Tensor | None = None,
                question_ids: torch.Tensor | None = None, question_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = removed_ids.shape
        if t > self.cfg.max_len:
            raise ConfigError("max_len", f"a removed segment of {t} tokens exceeds memory.max_len {self.cfg.max_len}")
        if removed_mask is None:
            removed_mask = torch.ones_like(removed_ids)
        x = self._embed(removed_ids) + self.pos(torch.arange(t, device=removed_ids.device))[None]
        if self.segment is not None:
            if question_ids is None:
                raise ConfigError("query_aware", "a query-aware mem_encoder needs the question tokens")
            tq = question_ids.shape[1]
            qx = self._embed(question_ids) + self.pos(torch.arange(tq, device=question_ids.device))[None] + self.segment.weight[1]
            x = torch.cat([x + self.segment.weight[0], qx], dim=1)
            removed_mask = torch.cat([removed_mask, question_mask if question_mask is not None else torch.ones_like(question_ids)], 1)
        x = torch.cat([self.null.expand(b, -1, -1), x], dim=1)
        pad = torch.cat([removed_mask.new_ones(b, 1), removed_mask], dim=1) == 0  # True = ignore
        for layer in self.self_layers:
            x = layer(x, src_key_padding_mask=pad)
        q = self.queries.expand(b, -1, -1)
        for layer in self.cross_layers:
            q = layer(q, x, pad)
        out = self.out_norm(self.proj(self.ln_out(q)))
        self.last_output = out.detach()
        return out
