"""engram_hash and hybrid_hash_content against the `layer` point's contract."""

import torch
from engram_llm_hash.memories import (
    EngramHashConfig,
    EngramHashMemory,
    HybridHashContentConfig,
    HybridHashContentMemory,
)

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


def test_exact_match_data_trains_and_generates_on_the_core_backbone(tmp_path):
    """llm-hash's completion data on the core backbone with a layer memory: the core
    token_lm loss reads it, and the plugin's exact_match metric generates through the
    backbone (KV cache and not agree)."""
    from engram_llm_hash.data import ExactMatchConfig, ExactMatchDataset
    from engram_llm_hash.metrics import ExactMatchMetric, ExactMatchMetricConfig

    from engram_core.builtin.backbone import CausalBackbone, CausalBackboneConfig
    from engram_core.builtin.lm import TokenLMConfig, TokenLMObjective
    from engram_core.components import BuildContext, EvalContext, Model

    data = ExactMatchDataset(ExactMatchConfig(categories=["synthetic"], n_synthetic=12), BuildContext(cache_dir=tmp_path))
    torch.manual_seed(0)
    head = CausalBackbone(CausalBackboneConfig(dim=16, n_layers=2, n_heads=2, window=4), BuildContext(spec=data.spec))
    mem = EngramHashMemory(EngramHashConfig(**SMALL), BuildContext(spec=data.spec, head=head))
    model = Model(head, mem, "layer")
    batch = data.sample("train", 4, torch.Generator().manual_seed(0))
    loss, terms = TokenLMObjective(TokenLMConfig(), BuildContext())(model, batch)
    assert torch.isfinite(loss) and 0 <= float(terms["token_acc"]) <= 1
    metric = ExactMatchMetric(ExactMatchMetricConfig(max_examples=6), BuildContext())
    metric.bind(EvalContext(model, data, "eval", 0, "s", None, 4, torch.device("cpu")))
    metric.reset()
    batches = list(metric.batches(data, "eval", 4))
    with torch.no_grad():
        for b in batches:
            metric.update(model, b)
            cached = head.generate(b["prompt_ids"], 5, use_cache=True)
            assert torch.equal(cached, head.generate(b["prompt_ids"], 5, use_cache=False))
    assert 0.0 <= metric.compute()["exact_match"] <= 1.0
