"""engram_hash and hybrid_hash_content against the `layer` point's contract."""

import torch
from engram_llm_hash.memory import EngramHashConfig, EngramHashMemory, HybridHashContentConfig, HybridHashContentMemory

from engram_core.testing.points import LayerPointContract, backbone_build

SMALL = dict(memory_size=512, layers=[0, 1], orders=[1, 2], heads_per_order=2, slot_dim=8)


class TestEngramHashLayerPoint(LayerPointContract):
    def make_memory(self, seed):
        return EngramHashMemory(EngramHashConfig(**SMALL, conv_kernel=3), backbone_build(width=self.width, vocab_size=self.vocab_size))

    def close(self, memory):
        with torch.no_grad():
            for block in memory.blocks.values():
                block.gate_bias.fill_(-1e4)


class TestHybridLayerPoint(LayerPointContract):
    def make_memory(self, seed):
        return HybridHashContentMemory(HybridHashContentConfig(**SMALL, top_k=4), backbone_build(width=self.width, vocab_size=self.vocab_size))

    def close(self, memory):
        with torch.no_grad():
            for block in memory.blocks.values():
                block.gate_bias.fill_(-1e4)
                block.content_gate.bias.fill_(-1e4)
