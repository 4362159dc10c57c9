"""Context memories: K latent vectors written from the removed tokens, read as a prefix.

`mem_encoder`   a small Perceiver-style encoder: token + position embeddings, a few
                self-attention layers over the removed tokens, then K learned queries
                that cross-attend to them (with latent self-attention and an MLP),
                projected to the reader's width.
`reader_encoder` the reader itself writes the memory (ICAE / xRAG / 500xCompressor):
                removed tokens + K learned memory-token embeddings go through the reader
                with its own LoRA adapter `encoder` switched on; the last hidden states
                at the K memory tokens, projected, are the memory.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from engram_core.components import BuildContext, Memory
from engram_core.config import ConfigError, field, non_negative, positive


def _reader_width(build: BuildContext, out_dim: int) -> int:
    head = build.head
    width = getattr(head, "width", None) if head is not None else None
    if width is None:
        if out_dim <= 0:
            raise ConfigError("out_dim", "no reader to take the width from: set out_dim (the reader's embedding width)")
        return out_dim
    if out_dim and out_dim != width:
        raise ConfigError("out_dim", f"the encoder projects to {out_dim} but the reader's embedding width is {width}; "
                                     "set out_dim = 0 (follow the reader) or the reader's width")
    return width


class _ContextPointMixin:
    """The `context` point (engram_core.points.ContextPoint) for both compressors."""

    def context_shape(self) -> tuple[int, int]:
        return self.cfg.n_slots, self.out_width

    def write_context(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self(ids, mask)


class _MemoryStatsMixin:
    """Parameter-update check: relative change of the memory's parameters since it was built."""

    def _snapshot(self) -> None:
        # kept outside the state_dict on purpose: a debug reference, not model state
        self._init_params = {n: p.detach().clone() for n, p in self.named_parameters()}

    def param_update(self) -> float:
        num, den = 0.0, 0.0
        for n, p in self.named_parameters():
            p0 = self._init_params.get(n)
            if p0 is None or p0.shape != p.shape:
                continue
            num += float((p.detach().cpu() - p0.cpu()).pow(2).sum())
            den += float(p0.pow(2).sum())
        return (num / max(den, 1e-12)) ** 0.5

    def stats(self) -> dict[str, float]:
        out = {"param_update": self.param_update()}
        last = getattr(self, "last_output", None)
        if last is not None and last.shape[0] > 1:
            flat = torch.nn.functional.normalize(last.flatten(1).float(), dim=-1)
            sim = flat @ flat.t()
            n = sim.shape[0]
            out["batch_cos"] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
        return out


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


class MemEncoder(_ContextPointMixin, _MemoryStatsMixin, Memory):
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
        self.out_width = _reader_width(build, cfg.out_dim)
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


@attrs.frozen
class ReaderEncoderConfig:
    """The reader itself, with its own LoRA adapter, writes the K memory vectors."""

    n_slots: int = field(8, help="K, the number of memory tokens (prefix length)", validator=positive)
    lora_rank: int = field(8, help="rank of the encoder-only LoRA adapter added to the reader", validator=positive)
    lora_alpha: float = field(16.0, help="LoRA scale numerator", validator=positive)
    out_dim: int = field(0, help="0 = the reader's width (the only width allowed)", validator=non_negative)
    output_norm: bool = field(True, help="LayerNorm on the projected memory")


class ReaderEncoder(_ContextPointMixin, _MemoryStatsMixin, Memory):
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
        self.out_width = _reader_width(build, cfg.out_dim)
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
