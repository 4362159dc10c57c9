"""The Engram blocks of the `engram_hash` and `hybrid_hash_content` memories (memories/),
with their configs and the helpers that size them from the head.

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
import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from engram_core.components import BuildContext
from engram_core.config import ConfigError, field, non_negative, one_of, positive
from engram_core.tables.row_tables import known_placement, make_row_table

from . import kernels
from .hashing import NgramHasher, byte_token_texts, canonical_map
from .telemetry import BlockTelemetry

GATES = ("context", "learned", "fixed")
FUSE = ("auto", "compile", "off")
CONV_IMPLS = ("auto", "conv1d", "taps")
# fuse = "auto" compiles the block's elementwise regions from this many (tokens x width)
# numbers up: 2^20, e.g. 1,024 tokens at width 1,024 (the block: 16,384 x 1,024)
FUSE_MIN_ELEMENTS = 1 << 20


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
    gate_signed_sqrt: bool = field(
        True, help="the context gate takes the signed square root of its score (the paper's); false: the score itself, whose "
        "gradient stays bounded near 0, where the square root's (1/(2√|s|)) amplifies bf16 rounding (docs/plugins/llm-hash.md)",
    )
    conv_kernel: int = field(4, help="short causal depthwise conv kernel over values (0 = off)", validator=non_negative)
    canonical: bool = field(False, help="hash canonical ids (case-folded, normalised token text) instead of raw ids")
    sparse: bool = field(
        False, help="sparse table gradients always (nn.Embedding(sparse=True)); train the table with sparse_adam or a row-wise optimiser "
        "(which on CUDA makes them sparse by itself: rowwise_adam / rowwise_adagrad update the rows read inside the backward)",
    )
    init_std: float = field(0.02, help="std of the table's initial rows", validator=non_negative)
    hash_seed: int = field(0, help="seed of the hash multipliers (layer index is mixed in)")
    placement: str = field(
        "device",
        help="where the table rows live: 'device' (an nn.Embedding), 'host' (host memory, rows prefetched), 'sharded' (rows split over ranks), or a placement a plugin registers",
        validator=known_placement,
    )
    kernels: str = field(
        "auto", help="'auto' fused Triton kernels on CUDA where triton imports, else torch; 'torch' always; 'triton' always",
        validator=one_of(*kernels.KERNELS),
    )
    fuse: str = field(
        "auto",
        help="the block's elementwise work (the conv path's RMSNorm, SiLU and sum; the context gate's fp32 RMSNorms, signed "
        "square root and sigmoid; the residual) as torch.compile'd regions: 'auto' on CUDA for (tokens x width) >= 2^20 "
        "unless the step is compiled already, 'compile' on any device and size, 'off' never",
        validator=one_of(*FUSE),
    )
    conv_impl: str = field(
        "auto",
        help="how the causal depthwise conv is computed: 'conv1d' (torch's convolution), 'taps' (conv_kernel shifted "
        "multiply-adds: elementwise work a compiler fuses with the norm and SiLU around it), 'auto' taps inside compiled "
        "code (the fused regions, a compiled step) and conv1d eagerly; the same numbers up to summation order",
        validator=one_of(*CONV_IMPLS),
    )


@attrs.frozen
class HybridHashContentConfig(EngramHashConfig):
    """engram_hash plus content retrieval: the k table rows most similar to a query of the
    hidden state, softly weighted, projected and gated separately, both added."""

    top_k: int = field(8, help="rows retrieved by content similarity", validator=positive)
    tau: float = field(1.0, help="softmax temperature over the k nearest rows' distances", validator=positive)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return _rms_norm(x, self.weight, self.eps)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 whatever the compute dtype (as transformers' own RMSNorms: bf16 squares
    lose too much); a function, so the block's regions below can be compiled whole."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


def conv_mix(v, norm_weight, eps: float, conv_weight, valid, receptive: int, dilation: int, impl: str = "conv1d"):
    """v + SiLU(conv(RMSNorm(v))): the block's short causal depthwise conv over (B, W, d)
    values; `valid` (B, W) or None zeroes packed-out padding before the conv. `impl`
    (`conv_impl`): "taps" sums the kernel's shifted taps, w[:, k] · x[t - receptive + k·dilation],
    elementwise work that inductor fuses with the norm and SiLU (forward and backward)
    where a convolution is a library call of its own with its own passes over the tensor;
    "auto" takes the taps inside compiled code and the convolution eagerly."""
    x = _rms_norm(v, norm_weight, eps)
    if valid is not None:
        x = x * valid[..., None].to(x.dtype)
    if impl == "taps" or (impl == "auto" and torch.compiler.is_compiling()):
        width = x.shape[1]
        # summed in fp32 and rounded once, as a convolution accumulates (bf16 sums per tap
        # would round K times)
        xf = F.pad(x.float(), (0, 0, receptive, 0))  # (B, receptive + W, d): zeros before the start
        w = conv_weight[:, 0, :].to(x.dtype).float()  # (d, K), rounded as the convolution's operand is
        y = xf[:, 0:width] * w[:, 0]
        for k in range(1, conv_weight.shape[-1]):
            y = y + xf[:, k * dilation : k * dilation + width] * w[:, k]
        return v + F.silu(y.to(x.dtype))
    x = F.pad(x.transpose(1, 2), (receptive, 0))
    return v + F.silu(F.conv1d(x, conv_weight, None, 1, 0, dilation, conv_weight.shape[0])).transpose(1, 2)


def context_gate_residual(hidden, v, k, norm_h_weight, eps_h: float, norm_k_weight, eps_k: float, bias, dim: int,
                          signed_sqrt: bool = True):
    """(h + g·v, g) with the context gate g = σ(signed_sqrt(RMSNorm(h)·RMSNorm(k)/√d) + b)."""
    h = hidden.to(v.dtype)
    s = (_rms_norm(h, norm_h_weight, eps_h) * _rms_norm(k, norm_k_weight, eps_k)).sum(-1, keepdim=True) / math.sqrt(dim)
    if signed_sqrt:
        s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
    g = torch.sigmoid(s + bias)
    return hidden + (g * v).to(hidden.dtype), g


_COMPILED: dict = {}
_COMPILE_FAILED: list[str] = []  # 'auto' falls back to eager for the process after a compile failure


def _fused_call(fn, strict: bool, *args):
    """`fn` compiled (once per function; torch.compile recompiles for new shapes itself). A
    compile failure under 'auto' warns once and runs `fn` eagerly from then on; under
    'compile' it is raised."""
    from engram_core.run.accel import is_compile_failure

    if _COMPILE_FAILED and not strict:
        return fn(*args)
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    try:
        return _COMPILED[fn](*args)
    except Exception as exc:
        if strict or not is_compile_failure(exc):
            raise
        import warnings

        _COMPILE_FAILED.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}")
        warnings.warn(f"engram_hash: fuse='auto' could not compile the block's elementwise regions ({_COMPILE_FAILED[0]}); "
                      "running them eagerly (set fuse = 'off' to silence, 'compile' to see the error)", stacklevel=2)
        return fn(*args)


def pack_kept(ids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept ids (keep (B, L) bool) moved to its end, in order, padding first:
    (packed ids, packed keep)."""
    order = torch.sort(keep.to(torch.uint8), dim=1, stable=True).indices
    return ids.gather(1, order), keep.gather(1, order)


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
        if hasattr(self.table, "init_normal_"):  # a table that draws its own rows: sharded (those it owns), host (parallel chunks)
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
        packed, valid = pack_kept(ids, attention_mask.cpu().bool())
        return hasher.addresses_from_mixes(hasher.mixes(packed, valid))

    @property
    def usage(self) -> torch.Tensor:
        """Reads of each table row since the last reset."""
        return self.telemetry.usage

    @property
    def last_gate(self) -> torch.Tensor | None:
        """Gate values of the real positions of the last recorded forward (flat)."""
        return self.telemetry.gates()

    def fused(self, device: torch.device, elements: int) -> bool:
        """Whether the elementwise regions run compiled for a (tokens x width) tensor of
        `elements` numbers on `device` (`fuse`): never inside a step torch.compile is tracing
        already (it fuses them itself); under "auto" only on CUDA and only from
        `FUSE_MIN_ELEMENTS` up, where the elementwise traffic is what the block's time goes to
        (a small model or a one-token decode step stays eager and pays no compilation)."""
        if self.cfg.fuse == "off" or torch.compiler.is_compiling():
            return False
        return self.cfg.fuse == "compile" or (device.type == "cuda" and elements >= FUSE_MIN_ELEMENTS)

    def _region(self, fn, sized: torch.Tensor, *args):
        """`fn(*args)`, compiled where `fused` says so for a tensor like `sized`, else as it is
        (the same operations: the CPU's numbers do not depend on `fuse`)."""
        if self.fused(sized.device, sized.numel()):
            return _fused_call(fn, self.cfg.fuse == "compile", *args)
        return fn(*args)

    @property
    def receptive(self) -> int:
        """Earlier positions whose values the conv reads."""
        return (self.conv_kernel - 1) * self.dilation if self.conv_kernel > 0 else 0

    @property
    def reach(self) -> int:
        """Earlier ids a position's value depends on: its longest n-gram's and the conv's."""
        return max(self.cfg.orders) - 1 + self.receptive

    def _hash(self, seq: torch.Tensor, lo: int, hi: int, valid: torch.Tensor | None = None):
        """Rows (B, hi-lo, H) and n-gram mixes of positions [lo, hi) of the id sequence `seq`."""
        hash_window = kernels.hash_window_triton if kernels.use_triton(self.cfg.kernels, seq.device) else kernels.hash_window_torch
        return hash_window(self.hasher, seq, lo, hi, valid)

    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        """The table's rows (B, W, H) → (B, W, H*slot) in the projections' dtype."""
        compute = self.value_proj.weight.dtype
        # the fused gather's backward is a dense table gradient: only for tables that make one
        # (not sparse, not updated row-wise in backward: engram_core.tables.rowwise)
        fused = kernels.use_triton(self.cfg.kernels, rows.device)
        if fused and getattr(self.table, "placement", None) == "device" and not getattr(self.table, "row_gradients", self.cfg.sparse):
            return kernels.gather_rows_triton(self.table.weight, rows, compute)  # one launch, cast fused
        return self.table(rows).flatten(2).to(compute)  # a master table may be kept in another dtype

    def _window(self, seq: torch.Tensor, lo: int, hi: int, valid: torch.Tensor | None = None, read: torch.Tensor | None = None):
        """Rows, n-gram mixes, values and keys of positions [lo, hi) of the id sequence `seq`.

        Each position's n-gram reaches max_order-1 ids back and the conv `receptive`
        positions back; callers pass lo early enough for the positions they keep, so
        generation costs O(1) per token however long the history. `valid` (B, L) or None:
        0 = a position that acts as before the sequence start (no n-gram, zero conv input).
        `read`: these positions' table rows, read already (`read_ahead`)."""
        rows, mixes = self._hash(seq, lo, hi, valid)
        e = read if read is not None else self._read(rows)
        v = self.value_proj(e)
        if self.conv_kernel > 0:  # packed-out padding (valid = 0) reads as the zeros before the start
            v = self._region(conv_mix, v, v, self.conv_norm.weight, self.conv_norm.eps, self.conv.weight,
                             None if valid is None else valid[:, lo:hi], self.receptive, self.dilation, self.cfg.conv_impl)
        k = self.key_proj(e) if self.key_proj is not None else None
        return rows, mixes, v, k

    def read_ahead(self, ids: torch.Tensor, t: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The table read that `values_and_keys(ids, t, attention_mask)` makes, made now; handed
        back to it as `read`, that forward then reads nothing from the table.

        Why: a table whose gradient is made as rows (a row-wise optimiser updating it in
        backward) cannot be read inside a torch.compile'd graph (inductor cannot lower a
        sparse gradient), so each memory layer's read was a graph break in the middle of the
        model's forward, inside a decoder layer's hook. Read ahead, eagerly, before the
        compiled forward starts (`HFInjector`), the model compiles with no break inside it:
        on an H100 (torch 2.11) a compiled training step with the breaks inside left the
        tables without gradient (benchmarks/compiled_memory_check.py)."""
        total = ids.shape[1]
        seq, valid = (ids, None) if attention_mask is None else pack_kept(ids, attention_mask.bool())
        rows, _ = self._hash(seq, self._first_needed(total, t), total, valid)
        return self._read(rows)

    def _first_needed(self, total: int, t: int) -> int:
        """First position whose value the last t of `total` positions need (the conv reaches back)."""
        return max(0, total - t - self.receptive)

    def values_and_keys(self, ids: torch.Tensor, t: int, attention_mask: torch.Tensor | None = None, read: torch.Tensor | None = None):
        """Values/keys of the last t positions from ids only: (B, t, d) each (keys None if
        unused), plus what telemetry needs: rows (N, H) and mixes (N, O) of the kept
        positions among those t.

        `attention_mask` (B, L) like ids, 0 = padding: a padded position never enters an
        n-gram or the conv. The kept ids of each row are moved to its front, in order (a
        row then reads exactly what the unpadded sequence reads), the window is computed
        there and each kept position takes its value back; padded positions get 0.

        Also returned: `real` (N,) bool, which of the N = B*t telemetry positions are kept
        (None without a mask). Nothing here waits for the device. `read`: the table read
        `read_ahead` made for the same arguments."""
        total = ids.shape[1]
        lo = self._first_needed(total, t)
        if attention_mask is None:
            rows, mixes, v, k = self._window(ids, lo, total, read=read)
            v, k = v[:, -t:], (k[:, -t:] if k is not None else None)
            return v, k, rows[:, -t:].flatten(0, 1), mixes[:, -t:].flatten(0, 1), None
        # Pack each row's kept ids to its END, in order (padding first). A kept position
        # among the last t then has a packed index >= total - t (at most t kept positions
        # follow it), so the window is [total - t - receptive, total) whatever the mask:
        # fixed shapes, no host synchronisation. The packed-out padding in front acts as
        # "before the sequence start" (`valid`), exactly as the unpadded sequence sees it.
        keep = attention_mask.bool()
        packed, valid = pack_kept(ids, keep)
        n_kept = keep.sum(1, keepdim=True)
        where = (total - n_kept + keep.long().cumsum(1) - 1).clamp(min=0)[:, -t:]  # packed index of each of the last t
        kept = keep[:, -t:]
        rows, mixes, v, k = self._window(packed, lo, total, valid, read=read)
        at = (where - lo).clamp(min=0)[..., None]  # a padded position points anywhere in range: its value is zeroed
        take = lambda x: x.gather(1, at.expand(-1, -1, x.shape[-1]))  # noqa: E731
        zero = kept[..., None].to(v.dtype)
        v = take(v) * zero
        k = take(k) if k is not None else None
        return v, k, take(rows).flatten(0, 1), take(mixes).flatten(0, 1), kept.reshape(-1)

    def gate(self, hidden: torch.Tensor, v: torch.Tensor, k: torch.Tensor | None) -> torch.Tensor:
        """The 'learned' and 'fixed' gates (the 'context' gate is `context_gate_residual`)."""
        if self.cfg.gate == "learned":
            return torch.sigmoid(self.gate_proj(torch.cat([hidden, v], -1)) + self.gate_bias)
        return torch.sigmoid(self.gate_bias).expand(hidden.shape[:-1] + (1,))

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, record: bool = True,
                read: torch.Tensor | None = None) -> torch.Tensor:
        """`record=False` leaves the telemetry alone (a gradient-checkpointing recomputation
        of a forward that was already counted); `read`: the table read made ahead (`read_ahead`)."""
        t = hidden.shape[1]
        v, k, rows, mixes, real = self.values_and_keys(ids, t, attention_mask, read)
        if self.cfg.gate == "context":
            out, g = self._region(context_gate_residual, hidden, hidden, v, k, self.norm_h.weight, self.norm_h.eps,
                                  self.norm_k.weight, self.norm_k.eps, self.gate_bias, self.dim, self.cfg.gate_signed_sqrt)
        else:
            g = self.gate(hidden.to(v.dtype), v, k)
            out = hidden + (g * v).to(hidden.dtype)
        if self.track and record:
            self.telemetry.record(rows, mixes, real, g.reshape(-1, 1))
        return out


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

    def forward(self, hidden, ids, attention_mask=None, record=True, read=None):
        from engram_core.nn import soft_topk

        out = super().forward(hidden, ids, attention_mask, record, read)
        h = hidden.to(self.query.weight.dtype)
        q = self.query(h)
        table = self.table.full_weight.to(q.dtype)
        retrieved, _ = soft_topk(q, table, table, self.top_k, self.tau)  # (B, t, slot)
        c = self.content_value(retrieved)
        g = torch.sigmoid(self.content_gate(torch.cat([h, c], -1)))
        if self.track and record:
            self.last_content_gate = g.detach().flatten().float()
        return out + (g * c).to(out.dtype)


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
