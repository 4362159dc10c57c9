"""`engram_hash`: hashed suffix n-grams read from one table per chosen decoder layer, added
as a gated residual after it (the blocks, their config and the hashing: `engram_llm_hash.blocks`)."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
from torch import nn

from engram_core.components import BuildContext, FitContext, Memory
from engram_core.config import ConfigError

from ..blocks import EngramBlock, EngramHashConfig, build_canonical, check_layers, memory_dims


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

    def state_numbers(self, seq_len: int) -> int:
        """What decoding carries from token to token: each block's last max_order - 1 + its
        conv's reach token ids (the rows and values are recomputed from them; the table is a
        parameter, not state). Whatever the sequence's length."""
        return sum(b.reach for b in self.blocks.values())

    @property
    def reach(self) -> int:
        """Ids before a position that its value depends on (its n-grams and the conv), the
        most over the blocks: what a KV-cached step needs besides its own ids."""
        return max(b.reach for b in self.blocks.values())

    # -- the injection point (engram_core.points.LayerPoint) ------------------------
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.blocks)

    def apply_layer(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, record: bool = True,
        read: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """hidden (B, t, d) after decoder layer `layer`; ids (B, L) every id so far;
        attention_mask (B, L) or None, 0 = a padded position (never hashed, never convolved);
        `read`: this layer's table read made ahead (`reads_ahead`), or None."""
        block = self._block(layer)
        if not self.enabled or block is None:
            return hidden
        if ids is None:
            raise RuntimeError("engram memory needs token ids (the forward was given only embeddings)")
        return block(hidden, ids, attention_mask, record, read)

    def reads_ahead(self, ids: torch.Tensor, t: int, attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """layer -> its table read for a forward of the last t positions of ids, made now
        (`EngramBlock.read_ahead`), for each block whose table makes its gradient as rows
        (the reads a compiled forward cannot hold); empty while the memory is off."""
        if not self.enabled:
            return {}
        return {int(key): block.read_ahead(ids, t, attention_mask)
                for key, block in self.blocks.items() if getattr(block.table, "row_gradients", False)}

    def _block(self, layer: int):
        # compared as ints, not looked up by str(layer): torch.compile may trace `layer` as
        # a symbolic int, which str() cannot take without a graph break
        return next((b for k, b in self.blocks.items() if int(k) == layer), None)

    def forward(
        self, hidden: torch.Tensor, ids: torch.Tensor, layer: int | None = None, attention_mask: torch.Tensor | None = None, record: bool = True,
        read: torch.Tensor | None = None,
    ) -> torch.Tensor:
        layer = int(next(iter(self.blocks))) if layer is None else layer
        return self.apply_layer(layer, hidden, ids, attention_mask, record, read)

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

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Forwards inside read the memory as usual but leave its telemetry (slot usage,
        the collision sample, the last gates) as it was: a metric scoring a side split
        (the unseen keys) does not change what the stage's own evaluation reports."""
        before = {key: block.track for key, block in self.blocks.items()}
        for block in self.blocks.values():
            block.track = False
        try:
            yield
        finally:
            for key, block in self.blocks.items():
                block.track = before[key]

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
