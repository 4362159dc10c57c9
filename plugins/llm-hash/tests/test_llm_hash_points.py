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


def test_the_state_is_the_ids_the_blocks_reach_back_to():
    """`state_numbers`: each block's last max_order - 1 + conv reach ids. The memory's output at
    the last position is the same whatever the ids before that reach, and changes with the
    id at its far end (so the count is not larger than the memory needs, nor smaller)."""
    torch.manual_seed(0)
    cfg = EngramHashConfig(memory_size=512, layers=[0], orders=[2, 3], heads_per_order=2, slot_dim=8, conv_kernel=3, gate="fixed", gate_bias=5.0)
    memory = EngramHashMemory(cfg, backbone_build(width=32, vocab_size=64)).eval()
    block = memory.blocks["0"]
    with torch.no_grad():
        block.conv.weight.normal_()  # zero at init: the conv would read nothing
    reach = max(cfg.orders) - 1 + block.receptive
    assert memory.state_numbers(100) == reach == 2 + 2 * 3
    L = 24
    ids = torch.randint(1, 64, (1, L), generator=torch.Generator().manual_seed(1))
    hidden = torch.randn(1, L, 32)
    far = ids.clone()
    far[:, : L - 1 - reach] = torch.randint(1, 64, (1, L - 1 - reach), generator=torch.Generator().manual_seed(2))
    edge = ids.clone()
    edge[:, L - 1 - reach] = (ids[:, L - 1 - reach] % 63) + 1
    with torch.no_grad():
        out, out_far, out_edge = (memory.apply_layer(0, hidden, x)[:, -1] for x in (ids, far, edge))
    assert torch.equal(out, out_far)
    assert not torch.allclose(out, out_edge)
