"""Engram memory blocks and the `engram_hash` / `hybrid_hash_content` memory types.

One `EngramBlock` sits after one decoder layer. Its forward takes the hidden states of
the positions being processed (B, t, d) and ALL token ids so far (B, L >= t); only the
ids decide which rows are read, so a generation step with a KV cache (t = 1) reads
exactly what a full forward reads at that position.

    rows  = hasher.addresses(ids)                 (B, L, H)  ids only
    e     = concat_h table[rows]                  (B, L, H*slot_dim)
    v     = W_v e ;  v += SiLU(conv(RMSNorm(v)))  optional short causal depthwise conv
    k     = W_k e
    g     = σ(signed_sqrt(RMSNorm(h)·RMSNorm(k)/√d) + b)      gate "context" (paper)
          | σ(w·[h; v] + b), b starts at -5                   gate "learned" (seed)
          | σ(b), b fixed                                     gate "fixed"
    out   = h + g * v                            pure residual, no extra norm

Departure from the demo: the short convolution runs on the ungated values (which depend
on ids only) and the gate multiplies its output. The demo gates first and convolves
the gated values, which depend on hidden states of earlier positions and would need a
convolution state inside the KV cache; ours recomputes the few earlier positions from
ids alone, so cached generation stays exact.
"""

from __future__ import annotations

import copy
import functools
import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from engram_core.components import BuildContext, FitContext, Memory
from engram_core.config import ConfigError, field, non_negative, one_of, positive
from engram_core.tables.row_tables import KNOWN_PLACEMENTS, make_row_table

from . import kernels
from .hashing import NgramHasher, byte_token_texts, canonical_map
from .telemetry import BlockTelemetry

GATES = ("context", "learned", "fixed")


def _orders_ok(inst, attribute, value):
    if not value or any((not isinstance(n, int)) or n < 1 or n > 16 for n in value):
        raise ConfigError(attribute.name, f"must be a non-empty list of n-gram orders in [1, 16], got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(attribute.name, f"orders must be distinct, got {value!r}")


def _layers_ok(inst, attribute, value):
    if not value or any((not isinstance(n, int)) or n < 0 for n in value):
        raise ConfigError(attribute.name, f"must be a non-empty list of layer indices >= 0, got {value!r}")


@attrs.frozen
class EngramHashConfig:
    """Hashed n-gram memory injected after chosen decoder layers (one table per layer)."""

    memory_size: int = field(
        65536, help="rows of each layer's table, split over all hash heads (1 = one shared row: the control)", validator=positive
    )
    layers: list[int] = field(factory=lambda: [1], help="decoder layers (0-based) after which a memory block is added", validator=_layers_ok)
    orders: list[int] = field(factory=lambda: [2, 3], help="n-gram orders hashed at each position", validator=_orders_ok)
    heads_per_order: int = field(8, help="hash heads (distinct prime slices) per order", validator=positive)
    slot_dim: int = field(32, help="width of one table row; a position reads len(orders)*heads rows", validator=positive)
    gate: str = field("context", help="'context' σ(RMSNorm(h)·RMSNorm(k)/√d), 'learned' σ(w·(h, v) + b) (seed), 'fixed' σ(b)", validator=one_of(*GATES))
    gate_bias: float = field(0.0, help="initial gate bias (the seed's learned gate used -5: memory ignored until trained)")
    conv_kernel: int = field(4, help="short causal depthwise conv kernel over values (0 = off)", validator=non_negative)
    canonical: bool = field(False, help="hash canonical ids (case-folded, normalised token text) instead of raw ids")
    sparse: bool = field(False, help="sparse table gradients (nn.Embedding(sparse=True)); train the table with sparse_adam")
    init_std: float = field(0.02, help="std of the table's initial rows", validator=non_negative)
    hash_seed: int = field(0, help="seed of the hash multipliers (layer index is mixed in)")
    placement: str = field(
        "device",
        help="where the table rows live: 'device' (an nn.Embedding), 'host' (host memory, rows prefetched), 'sharded' (rows split over ranks)",
        validator=one_of(*KNOWN_PLACEMENTS),
    )
    kernels: str = field(
        "auto", help="'auto' fused Triton kernels on CUDA where triton imports, else torch; 'torch' always; 'triton' always",
        validator=one_of(*kernels.KERNELS),
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # in fp32 whatever the compute dtype (as transformers' own RMSNorms): bf16 squares lose too much
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight.to(x.dtype)


class EngramBlock(nn.Module):
    """The memory after one layer: hash → gather → project → conv → gate → residual."""

    def __init__(self, cfg: EngramHashConfig, dim: int, vocab_size: int, layer: int, canonical: torch.Tensor | None):
        super().__init__()
        self.cfg = cfg
        self.dim = dim
        kernels.prepare(cfg.kernels)
        self.hasher = NgramHasher(
            vocab_size, cfg.memory_size, cfg.orders, cfg.heads_per_order, seed=cfg.hash_seed * 1000003 + layer, canonical=canonical
        )
        h = self.hasher.n_heads
        # rows are read only through the row-table protocol (engram_core.tables.row_tables)
        self.table = make_row_table(cfg.placement, self.hasher.total_rows, cfg.slot_dim, sparse=cfg.sparse)
        if hasattr(self.table, "init_normal_"):  # a sharded table draws only the rows it owns
            self.table.init_normal_(cfg.init_std)
        else:
            with torch.no_grad():
                nn.init.normal_(self.table.full_weight, std=cfg.init_std)
        self.value_proj = nn.Linear(h * cfg.slot_dim, dim, bias=False)
        self.key_proj = nn.Linear(h * cfg.slot_dim, dim, bias=False) if cfg.gate == "context" else None
        self.norm_h = RMSNorm(dim) if cfg.gate == "context" else None
        self.norm_k = RMSNorm(dim) if cfg.gate == "context" else None
        self.gate_proj = nn.Linear(2 * dim, 1) if cfg.gate == "learned" else None
        if self.gate_proj is not None:
            nn.init.normal_(self.gate_proj.weight, std=0.02)
        self.gate_bias = nn.Parameter(torch.tensor(float(cfg.gate_bias)), requires_grad=cfg.gate != "fixed")
        self.conv_kernel = cfg.conv_kernel
        self.dilation = max(cfg.orders)
        if cfg.conv_kernel > 0:
            self.conv_norm = RMSNorm(dim)
            self.conv = nn.Conv1d(dim, dim, cfg.conv_kernel, groups=dim, dilation=self.dilation, bias=False)
            nn.init.zeros_(self.conv.weight)  # starts as identity: v + SiLU(0) = v
        self.telemetry = BlockTelemetry(self.hasher.total_rows, len(self.hasher.orders), cfg.heads_per_order)
        self.track = True
        self._host_copies: dict[str, NgramHasher] = {}  # the hasher on the host, for prefetch_rows

    def prefetch_rows(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every row a forward over `ids` (B, L) would read, computed on the host (a copy
        of the hasher there): packed as `values_and_keys` packs padded rows."""
        if "hasher" not in self._host_copies:  # a plain dict: the copy is no submodule (state dict, .to())
            self._host_copies["hasher"] = copy.deepcopy(self.hasher).cpu()
        hasher = self._host_copies["hasher"]
        ids = ids.cpu()
        if attention_mask is None:
            return hasher.addresses(ids)
        keep = attention_mask.cpu().bool()
        order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices  # padding first, kept in order
        return hasher.addresses_from_mixes(hasher.mixes(ids.gather(1, order), keep.gather(1, order)))

    @property
    def usage(self) -> torch.Tensor:
        """Reads of each table row since the last reset."""
        return self.telemetry.usage

    @property
    def last_gate(self) -> torch.Tensor | None:
        """Gate values of the real positions of the last recorded forward (flat)."""
        return self.telemetry.gates()

    @property
    def receptive(self) -> int:
        """Earlier positions whose values the conv reads."""
        return (self.conv_kernel - 1) * self.dilation if self.conv_kernel > 0 else 0

    def _window(self, seq: torch.Tensor, lo: int, hi: int, valid: torch.Tensor | None = None):
        """Rows, n-gram mixes, values and keys of positions [lo, hi) of the id sequence `seq`.

        Each position's n-gram reaches max_order-1 ids back and the conv `receptive`
        positions back; callers pass lo early enough for the positions they keep, so
        generation costs O(1) per token however long the history. `valid` (B, L) or None:
        0 = a position that acts as before the sequence start (no n-gram, zero conv input)."""
        fused = kernels.use_triton(self.cfg.kernels, seq.device)
        hash_window = kernels.hash_window_triton if fused else kernels.hash_window_torch
        rows, mixes = hash_window(self.hasher, seq, lo, hi, valid)
        compute = self.value_proj.weight.dtype
        if fused and not self.cfg.sparse and getattr(self.table, "placement", None) == "device":
            e = kernels.gather_rows_triton(self.table.weight, rows, compute)  # one launch, cast fused
        else:
            e = self.table(rows).flatten(2).to(compute)  # (B, W, H*slot): a master table may be kept in another dtype
        v = self.value_proj(e)
        if self.conv_kernel > 0:
            x = self.conv_norm(v)
            if valid is not None:
                x = x * valid[:, lo:hi, None].to(x.dtype)  # packed-out padding reads as the zeros before the start
            x = x.transpose(1, 2)
            x = F.pad(x, (self.receptive, 0))
            v = v + F.silu(self.conv(x)).transpose(1, 2)
        k = self.key_proj(e) if self.key_proj is not None else None
        return rows, mixes, v, k

    def values_and_keys(self, ids: torch.Tensor, t: int, attention_mask: torch.Tensor | None = None):
        """Values/keys of the last t positions from ids only: (B, t, d) each (keys None if
        unused), plus what telemetry needs: rows (N, H) and mixes (N, O) of the kept
        positions among those t.

        `attention_mask` (B, L) like ids, 0 = padding: a padded position never enters an
        n-gram or the conv. The kept ids of each row are moved to its front, in order (a
        row then reads exactly what the unpadded sequence reads), the window is computed
        there and each kept position takes its value back; padded positions get 0.

        Also returned: `real` (N,) bool, which of the N = B*t telemetry positions are kept
        (None without a mask). Nothing here waits for the device."""
        total = ids.shape[1]
        lo = max(0, total - t - self.receptive)  # first position whose value is needed
        if attention_mask is None:
            rows, mixes, v, k = self._window(ids, lo, total)
            v, k = v[:, -t:], (k[:, -t:] if k is not None else None)
            return v, k, rows[:, -t:].flatten(0, 1), mixes[:, -t:].flatten(0, 1), None
        # Pack each row's kept ids to its END, in order (padding first). A kept position
        # among the last t then has a packed index >= total - t (at most t kept positions
        # follow it), so the window is [total - t - receptive, total) whatever the mask:
        # fixed shapes, no host synchronisation. The packed-out padding in front acts as
        # "before the sequence start" (`valid`), exactly as the unpadded sequence sees it.
        keep = attention_mask.bool()
        order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices  # padding first, kept in order
        packed = ids.gather(1, order)
        valid = keep.gather(1, order)
        n_kept = keep.sum(1, keepdim=True)
        where = (total - n_kept + keep.long().cumsum(1) - 1).clamp(min=0)[:, -t:]  # packed index of each of the last t
        kept = keep[:, -t:]
        rows, mixes, v, k = self._window(packed, lo, total, valid)
        at = (where - lo).clamp(min=0)[..., None]  # a padded position points anywhere in range: its value is zeroed
        take = lambda x: x.gather(1, at.expand(-1, -1, x.shape[-1]))  # noqa: E731
        zero = kept[..., None].to(v.dtype)
        v = take(v) * zero
        k = take(k) if k is not None else None
        return v, k, take(rows).flatten(0, 1), take(mixes).flatten(0, 1), kept.reshape(-1)

    def gate(self, hidden: torch.Tensor, v: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        if self.cfg.gate == "context":
            s = (self.norm_h(hidden) * self.norm_k(k)).sum(-1, keepdim=True) / math.sqrt(self.dim)
            s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
            return torch.sigmoid(s + self.gate_bias)
        if self.cfg.gate == "learned":
            return torch.sigmoid(self.gate_proj(torch.cat([hidden, v], -1)) + self.gate_bias)
        return torch.sigmoid(self.gate_bias).expand(hidden.shape[:-1] + (1,))

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, record: bool = True) -> torch.Tensor:
        """`record=False` leaves the telemetry alone (a gradient-checkpointing recomputation
        of a forward that was already counted)."""
        t = hidden.shape[1]
        v, k, rows, mixes, real = self.values_and_keys(ids, t, attention_mask)
        dtype = v.dtype
        g = self.gate(hidden.to(dtype), v, k)
        if self.track and record:
            self.telemetry.record(rows, mixes, real, g.reshape(-1, 1))
        return hidden + (g * v).to(hidden.dtype)


def memory_dims(build: BuildContext) -> tuple[int, int, int]:
    """(width, vocabulary, number of layers) of the head the memory attaches to."""
    head = build.head
    if head is None:
        raise ConfigError(None, "engram memories need a head (build.head is None)")
    dims = getattr(head, "memory_dims", None)
    if dims is None:
        raise ConfigError(None, f"head {type(head).__name__} does not expose memory_dims() (width, vocab, layers)")
    return dims()


def check_layers(layers, n_layers: int, key: str = "layers") -> None:
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(key, f"layer index {bad[0]} out of range: the model has {n_layers} layers (0..{n_layers - 1})")


def build_canonical(head) -> torch.Tensor:
    """Canonical ids of the head's vocabulary: the head's own map where it has one; a
    transformers tokenizer through its normaliser (byte-fallback tokens kept apart);
    otherwise the token texts (the byte tokenizer)."""
    if hasattr(head, "canonical_ids"):
        return head.canonical_ids()
    tokenizer = getattr(getattr(head, "codec", None), "hf", None)
    if tokenizer is not None:
        from .canonical import tokenizer_canonical_ids

        return tokenizer_canonical_ids(tokenizer, memory_dims(BuildContext(head=head))[1])
    texts = head.token_texts() if hasattr(head, "token_texts") else byte_token_texts()
    return canonical_map(texts)


class EngramHashMemory(Memory):
    """Engram: hashed suffix n-grams (K heads per order, prime slices of one table per
    layer), projected to keys and values, context-gated, added as a pure residual after
    the chosen decoder layers. Addresses come from token ids only (`addresses(ids)`)."""

    independent_batch_items = True

    def __init__(self, cfg: EngramHashConfig, build: BuildContext):
        super().__init__()
        dim, vocab, n_layers = memory_dims(build)
        check_layers(cfg.layers, n_layers)
        self.cfg = cfg
        canon = build_canonical(build.head) if cfg.canonical else None
        self.blocks = nn.ModuleDict({str(i): self._make_block(cfg, dim, vocab, i, canon) for i in sorted(set(cfg.layers))})
        self.trainable = True
        # Whether the head hands the batch's attention mask to `apply_layer` (the HF heads do;
        # the tiny and core heads call it with ids alone): `prefetch` must compute the rows
        # the forward will read, which depend on it for padded batches.
        self.reads_attention_mask = bool(getattr(build.head, "memory_reads_attention_mask", False))
        # vocabulary / distinct canonical ids (1.0 without canonical ids): the tokenizer compression
        self.vocab_compression = float(vocab / (int(canon.max()) + 1)) if canon is not None else 1.0

    def _make_block(self, cfg, dim, vocab, layer, canon):
        return EngramBlock(cfg, dim, vocab, layer, canon)

    @property
    def sharded_actions(self) -> tuple[str, ...]:
        """Tables split over ranks: `fit` runs on every rank (and refuses alike), so no rank
        waits for a broadcast from one that failed."""
        return ("fit",) if any(getattr(b.table, "sharded", False) for b in self.blocks.values()) else ()

    # -- the injection point (engram_core.points.LayerPoint) ------------------------
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.blocks)

    def apply_layer(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, record: bool = True
    ) -> torch.Tensor:
        """hidden (B, t, d) after decoder layer `layer`; ids (B, L) every id so far;
        attention_mask (B, L) or None, 0 = a padded position (never hashed, never convolved)."""
        # compared as ints, not looked up by str(layer): torch.compile may trace `layer` as
        # a symbolic int, which str() cannot take without a graph break
        block = next((b for k, b in self.blocks.items() if int(k) == layer), None)
        if not self.enabled or block is None:
            return hidden
        if ids is None:
            raise RuntimeError("engram memory needs token ids (the forward was given only embeddings)")
        return block(hidden, ids, attention_mask, record)

    def forward(
        self, hidden: torch.Tensor, ids: torch.Tensor, layer: int | None = None, attention_mask: torch.Tensor | None = None, record: bool = True
    ) -> torch.Tensor:
        layer = int(next(iter(self.blocks))) if layer is None else layer
        return self.apply_layer(layer, hidden, ids, attention_mask, record)

    # -- prefetch (the engine's `prefetch(batch)` hook; placement "host") ------------------
    @property
    def prefetches(self) -> bool:
        """Whether any table moves rows ahead of the forward (the engine then draws each
        batch one step early and hands it to `prefetch`)."""
        return any(getattr(b.table, "prefetches", False) for b in self.blocks.values())

    def prefetch(self, batch) -> None:
        """The next forward will read `batch` (a dict with ``input_ids`` and optionally
        ``attention_mask``, or an ids tensor (B, L)): each table that keeps its rows away
        from the device starts moving them now. Addresses are computed from the ids on
        the host (in the table's worker thread on CUDA)."""
        ids, mask = (batch.get("input_ids"), batch.get("attention_mask")) if isinstance(batch, dict) else (batch, None)
        mask = mask if self.reads_attention_mask else None  # as the forward will see the batch
        if not self.enabled or not isinstance(ids, torch.Tensor):
            return
        for block in self.blocks.values():
            if getattr(block.table, "prefetches", False):  # a table that moves rows ahead (placement 'host')
                block.table.prefetch(functools.partial(block.prefetch_rows, ids, mask))

    def addresses(self, ids: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """(B, T, H) table rows read at every position; computable ahead of the forward."""
        key = next(iter(self.blocks)) if layer is None else str(layer)
        return self.blocks[key].hasher.addresses(ids)

    # -- dtype and trainability ------------------------------------------------------
    def set_table_dtype(self, dtype: torch.dtype) -> None:
        """Keep the tables (the master rows) in `dtype` while the rest computes in its own
        dtype: rows are cast to the projections' dtype as they are read (e.g. fp32 master
        rows, bf16 reads). `module.to(dtype)` casts the tables too: call this after it."""
        for block in self.blocks.values():
            block.table.set_dtype(dtype)

    def requires_grad_(self, requires_grad: bool = True):
        """As nn.Module's, and remembered: a wrapper that later freezes every parameter it
        does not own (peft's get_peft_model) does not override this choice."""
        self.trainable = bool(requires_grad)
        return super().requires_grad_(requires_grad)

    # -- telemetry ---------------------------------------------------------------
    def collision_rate(self, layer: str | None = None) -> tuple[float, float]:
        """(observed, birthday expectation) fraction of distinct n-grams sharing their slot
        with another distinct n-gram, averaged over heads, among the positions sampled
        since the last `stats()` (telemetry.py: up to 65,536, strided, from the rows the
        forwards read)."""
        block = self.blocks[layer or next(iter(self.blocks))]
        return block.telemetry.collision_rate(block.hasher.moduli)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.cfg.canonical:
            out["vocab_compression"] = self.vocab_compression
        many = len(self.blocks) > 1
        for key, block in self.blocks.items():
            sfx = f"_l{key}" if many else ""
            out[f"slot_utilisation{sfx}"] = float((block.usage > 0).float().mean())
            out.update({f"{k}{sfx}": v for k, v in block.table.stats().items()})  # placement telemetry (prefetch hit rate, bytes moved)
            obs, exp = self.collision_rate(key)
            if math.isfinite(obs):
                out[f"collision_rate{sfx}"] = obs
                out[f"collision_rate_expected{sfx}"] = exp
            gates = block.last_gate
            if gates is not None and gates.numel():
                out[f"gate_mean{sfx}"] = float(gates.mean())
            block.telemetry.clear_sample()
        return out

    def histograms(self) -> dict[str, torch.Tensor]:
        """Gate values of the last forward and per-row usage counts. The engine reads
        `stats()` then `histograms()` at each evaluation; the gate record is cleared here,
        so an evaluation with the memory knocked out reports no stale gate."""
        out = {}
        for key, block in self.blocks.items():
            gates = block.last_gate
            if gates is not None:
                out["gate" if len(self.blocks) == 1 else f"gate_l{key}"] = gates
            out["slot_usage" if len(self.blocks) == 1 else f"slot_usage_l{key}"] = block.usage.float()
            block.telemetry.clear_gate()
            if hasattr(block, "last_content_gate"):
                block.last_content_gate = None
        return out

    def reset(self) -> None:
        for block in self.blocks.values():
            block.telemetry.reset()

    # -- pre-population ------------------------------------------------------------
    def fit(self, ctx: FitContext, phrases: list[str] | None = None, from_split: str = "", scale: float = 1.0, max_phrases: int = 100000) -> dict[str, float]:
        """Write embeddings of phrases at their hash addresses (the seed's pre-population).

        Each position's rows receive the head's token embedding of that position's token,
        projected into slot space by the least-squares inverse of the value projection, so
        that reading the rows back gives (about) the token embedding. Rows hit by several
        phrases get the mean. `phrases` is a list of texts, or `from_split` takes every
        example's full text (prompt + completion) of that data split.
        """
        head = ctx.model.head
        texts = list(phrases or [])
        if from_split:
            texts += [ex.prompt + ex.completion for ex in ctx.dataset.examples(from_split)]
        if not texts:
            raise ConfigError("options.phrases", "give phrases = [...] or from_split = '<split>' to pre-populate from")
        texts = texts[:max_phrases]
        written = 0
        with torch.no_grad():
            for block in self.blocks.values():
                W = block.value_proj.weight  # (d, H*slot)
                pinv = torch.linalg.pinv(W.float())  # (H*slot, d)
                full = block.table.full_weight  # every row, wherever the placement keeps them
                acc = torch.zeros_like(full)
                cnt = torch.zeros(full.shape[0], device=acc.device)
                for text in texts:
                    ids = head.encode_text(text).to(W.device)[None]
                    emb = head.token_embeddings(ids)[0]  # (T, d)
                    rows = block.hasher.addresses(ids)[0].to(acc.device)  # (T, H); the rows may live elsewhere (placement)
                    target = (emb.float() @ pinv.T) * scale  # (T, H*slot)
                    target = target.view(rows.shape[0], rows.shape[1], -1).to(acc.device)
                    acc.index_add_(0, rows.reshape(-1), target.reshape(-1, target.shape[-1]))
                    cnt.index_add_(0, rows.reshape(-1), torch.ones(rows.numel(), device=acc.device))
                hit = cnt > 0
                full[hit] = (acc[hit] / cnt[hit, None]).to(full.dtype)
                written += int(hit.sum())
        return {"prepopulated_rows": float(written), "prepopulated_phrases": float(len(texts))}


def collision_stats(mixes: torch.Tensor, hasher: NgramHasher) -> tuple[float, float]:
    """Observed vs birthday-bound collision fraction for distinct n-grams `mixes` (N, O)."""
    rates, expected = [], []
    for o in range(mixes.shape[1]):
        uniq = torch.unique(mixes[:, o])
        m = uniq.numel()
        for j in range(hasher.heads_per_order):
            h = o * hasher.heads_per_order + j
            p = int(hasher.moduli[h])
            slots = torch.remainder(uniq, p)
            _, inverse, counts = torch.unique(slots, return_inverse=True, return_counts=True)
            rates.append(float((counts[inverse] > 1).float().mean()))
            expected.append(1.0 - (1.0 - 1.0 / p) ** (m - 1))
    return sum(rates) / len(rates), sum(expected) / len(expected)


# ---------------------------------------------------------------------------------
@attrs.frozen
class HybridHashContentConfig(EngramHashConfig):
    """engram_hash plus content retrieval: the k table rows most similar to a query of the
    hidden state, softly weighted, projected and gated separately, both added."""

    top_k: int = field(8, help="rows retrieved by content similarity", validator=positive)
    tau: float = field(1.0, help="softmax temperature over the k nearest rows' distances", validator=positive)


class HybridBlock(EngramBlock):
    def __init__(self, cfg: HybridHashContentConfig, dim, vocab, layer, canonical):
        super().__init__(cfg, dim, vocab, layer, canonical)
        self.query = nn.Linear(dim, cfg.slot_dim, bias=False)
        self.content_value = nn.Linear(cfg.slot_dim, dim, bias=False)
        self.content_gate = nn.Linear(2 * dim, 1)
        nn.init.normal_(self.content_gate.weight, std=0.02)
        nn.init.constant_(self.content_gate.bias, -2.0)
        self.top_k = cfg.top_k
        self.tau = cfg.tau
        self.last_content_gate: torch.Tensor | None = None

    def forward(self, hidden, ids, attention_mask=None, record=True):
        from engram_core.nn import soft_topk

        out = super().forward(hidden, ids, attention_mask, record)
        h = hidden.to(self.query.weight.dtype)
        q = self.query(h)
        table = self.table.full_weight.to(q.dtype)
        retrieved, _ = soft_topk(q, table, table, self.top_k, self.tau)  # (B, t, slot)
        c = self.content_value(retrieved)
        g = torch.sigmoid(self.content_gate(torch.cat([h, c], -1)))
        if self.track and record:
            self.last_content_gate = g.detach().flatten().float()
        return out + (g * c).to(out.dtype)


class HybridHashContentMemory(EngramHashMemory):
    """Hash retrieval (ids) plus content retrieval (top-k table rows nearest a query of the
    hidden state), each projected and gated, both added as residuals. Content retrieval
    scans the whole table: use it with tables of ~10^5 rows or fewer. Dense gradients."""

    def __init__(self, cfg: HybridHashContentConfig, build: BuildContext):
        if cfg.sparse:
            raise ConfigError("sparse", "hybrid_hash_content reads the whole table by similarity; sparse gradients do not apply")
        if cfg.placement != "device":
            raise ConfigError("placement", "hybrid_hash_content scans every row by similarity each forward: keep its table on the device (placement = 'device')")
        super().__init__(cfg, build)

    def _make_block(self, cfg, dim, vocab, layer, canon):
        return HybridBlock(cfg, dim, vocab, layer, canon)

    def stats(self):
        out = super().stats()
        for key, block in self.blocks.items():
            if block.last_content_gate is not None:
                out["content_gate_mean" + (f"_l{key}" if len(self.blocks) > 1 else "")] = float(block.last_content_gate.mean())
        return out

