"""`hybrid_hash_content`: engram_hash plus content retrieval, the k table rows most similar
to a query of the hidden state (the block: `engram_llm_hash.blocks.HybridBlock`)."""

from __future__ import annotations

from engram_core.components import BuildContext
from engram_core.config import ConfigError

from ..blocks import HybridBlock, HybridHashContentConfig
from .engram_hash import EngramHashMemory


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
