"""engram_hash / hybrid_hash_content: the core contract plus the memory's own invariants."""

import pytest
import torch
from engram_llm_hash.memories import (
    EngramHashConfig,
    EngramHashMemory,
    HybridHashContentConfig,
    HybridHashContentMemory,
)
from llm_hash_helpers import DIM, LAYERS, VOCAB, dims_build, memory, perturb, tiny_model

from engram_core.components import BuildContext, FitContext
from engram_core.config import ConfigError
from engram_core.testing import MemoryContract


class _Inputs:
    def make_inputs(self, batch_size, generator):
        return {
            "hidden": torch.randn(batch_size, 7, DIM, generator=generator),
            "ids": torch.randint(0, VOCAB, (batch_size, 7), generator=generator),
        }

    def run(self, memory, inputs):
        return memory.apply_layer(0, inputs["hidden"], inputs["ids"])


class TestEngramHashContract(_Inputs, MemoryContract):
    def make_memory(self, seed):
        m = memory(gate="context")
        perturb(m, 0.1, seed)
        return m


class TestLearnedGateContract(_Inputs, MemoryContract):
    def make_memory(self, seed):
        return memory(gate="learned", gate_bias=-5.0, conv_kernel=0)


class TestHybridContract(_Inputs, MemoryContract):
    def make_memory(self, seed):
        return HybridHashContentMemory(HybridHashContentConfig(memory_size=101, layers=[0], heads_per_order=2, slot_dim=4, top_k=3), dims_build())


@pytest.mark.parametrize("gate", ["context", "learned", "fixed"])
def test_closed_gate_is_identity(gate):
    m = memory(gate=gate)
    perturb(m, 1.0)
    with torch.no_grad():
        for b in m.blocks.values():
            b.gate_bias.fill_(-1e4)  # σ(-1e4) == 0 exactly in float32
    h = torch.randn(3, 9, DIM)
    ids = torch.randint(0, VOCAB, (3, 9))
    assert torch.equal(m.apply_layer(0, h, ids), h)
    m.blocks["0"].gate_bias.data.fill_(3.0)
    assert not torch.equal(m.apply_layer(0, h, ids), h)


def test_disabled_memory_and_other_layers_pass_through():
    m = memory(layers=[1])
    perturb(m)
    h = torch.randn(2, 5, DIM)
    ids = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(m.apply_layer(0, h, ids), h)
    m.enabled = False
    assert torch.equal(m.apply_layer(1, h, ids), h)


def test_incremental_equals_full_forward():
    """Position-by-position (as under a KV cache: hidden of the new position, all ids so
    far) gives the full forward's output, conv and trained memory included."""
    m = memory(conv_kernel=4)
    perturb(m)
    h = torch.randn(2, 11, DIM)
    ids = torch.randint(0, VOCAB, (2, 11))
    full = m.apply_layer(0, h, ids)
    steps = torch.cat([m.apply_layer(0, h[:, t : t + 1], ids[:, : t + 1]) for t in range(11)], 1)
    assert torch.allclose(full, steps, atol=1e-6)


def test_layers_out_of_range_and_bad_config():
    with pytest.raises(ConfigError, match="out of range"):
        memory(layers=[LAYERS])
    with pytest.raises(ConfigError, match="memory_size"):
        EngramHashConfig(memory_size=0)
    with pytest.raises(ConfigError, match="orders"):
        EngramHashConfig(orders=[])


def test_stats_and_histograms():
    m = memory()
    m.train()
    m.apply_layer(0, torch.randn(4, 20, DIM), torch.randint(0, VOCAB, (4, 20)))
    s = m.stats()
    assert 0 < s["slot_utilisation"] <= 1
    assert 0 <= s["collision_rate"] <= 1 and 0 <= s["collision_rate_expected"] <= 1
    assert 0 < s["gate_mean"] < 1
    hist = m.histograms()
    assert hist["gate"].numel() == 80 and hist["slot_usage"].sum() == 80 * m.blocks["0"].hasher.n_heads
    assert "gate_mean" not in m.stats()  # cleared: a knocked-out evaluation shows no stale gate
    m.reset()
    assert m.stats()["slot_utilisation"] == 0


def test_sparse_table_gets_sparse_gradients():
    m = memory(sparse=True)
    out = m.apply_layer(0, torch.randn(2, 6, DIM), torch.randint(0, VOCAB, (2, 6)))
    out.sum().backward()
    g = m.blocks["0"].table.weight.grad
    assert g.is_sparse
    assert g.coalesce().indices().numel() <= 2 * 6 * m.blocks["0"].hasher.n_heads


def test_hybrid_rejects_sparse():
    with pytest.raises(ConfigError, match="sparse"):
        HybridHashContentMemory(HybridHashContentConfig(memory_size=101, sparse=True, layers=[0]), dims_build())


@pytest.mark.parametrize("kind", ["engram", "hybrid"])
def test_cached_generation_equals_uncached_on_tiny_head(tmp_path, kind):
    if kind == "engram":
        cls, cfg = EngramHashMemory, EngramHashConfig(memory_size=4001, layers=[0, 1], slot_dim=8, conv_kernel=3)
    else:
        cls, cfg = HybridHashContentMemory, HybridHashContentConfig(memory_size=501, layers=[1], slot_dim=8, top_k=4)
    data, head, mem, model = tiny_model(tmp_path, cls, cfg)
    perturb(mem, 0.5)
    batch = next(data.eval_batches("seen", 4))
    prompt = batch["input_ids"][:, :9]
    with torch.no_grad():
        a = head.generate(prompt, 12, use_cache=True)
        b = head.generate(prompt, 12, use_cache=False)
        mem.enabled = False
        c = head.generate(prompt, 12, use_cache=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the trained memory does change the output


def test_prepopulate_fit_writes_phrase_rows(tmp_path):
    data, head, mem, model = tiny_model(tmp_path, EngramHashMemory, EngramHashConfig(memory_size=20011, layers=[0], slot_dim=8))
    before = mem.blocks["0"].table.weight.clone()
    ctx = FitContext(model, data, torch.device("cpu"), torch.Generator(), 8, "train", None, 0)
    out = mem.fit(ctx, phrases=["PORT:ssh=22"])
    after = mem.blocks["0"].table.weight
    changed = (after != before).any(1)
    rows = mem.addresses(head.encode_text("PORT:ssh=22")[None]).unique()
    assert set(changed.nonzero().flatten().tolist()) <= set(rows.tolist())
    assert out["prepopulated_rows"] == changed.sum().item() > 0
    # reading a phrase's rows back through the value projection gives ~ the token embedding
    block = mem.blocks["0"]
    ids = head.encode_text("PORT:ssh=22")[None]
    e = block.table(block.hasher.addresses(ids)).flatten(2)
    emb = head.token_embeddings(ids)
    rel = ((block.value_proj(e) - emb).norm() / emb.norm()).item()
    assert rel < 0.5
    with pytest.raises(ConfigError, match="phrases"):
        mem.fit(ctx)
    mem.fit(ctx, from_split="train")


def test_addresses_usable_ahead_of_forward(tmp_path):
    data, head, mem, model = tiny_model(tmp_path, EngramHashMemory, EngramHashConfig(memory_size=4001, layers=[1]))
    ids = next(data.eval_batches("train", 3))["input_ids"]
    rows = mem.addresses(ids, layer=1)
    assert rows.shape == ids.shape + (16,)


def test_collision_stats_see_full_ngrams_under_incremental_calls():
    """Step-by-step calls (KV cache) record the same n-grams as one full call."""
    h = torch.randn(2, 12, DIM)
    ids = torch.randint(0, VOCAB, (2, 12))
    a, b = memory(), memory()
    a.apply_layer(0, h, ids)
    for t in range(12):
        b.apply_layer(0, h[:, t : t + 1], ids[:, : t + 1])
    sa, sb = a.stats(), b.stats()
    assert sa["collision_rate"] == sb["collision_rate"] and sa["collision_rate_expected"] == sb["collision_rate_expected"]


def test_canonical_ids_through_the_head(tmp_path):
    """canonical = true: case variants of a prompt read the same rows."""
    data, head, mem, model = tiny_model(tmp_path, EngramHashMemory, EngramHashConfig(memory_size=4001, layers=[0], canonical=True))
    a = mem.addresses(head.encode_text("PORT:SSH=")[None])
    b = mem.addresses(head.encode_text("port:ssh=")[None])
    assert torch.equal(a, b)
    plain = EngramHashMemory(EngramHashConfig(memory_size=4001, layers=[0]), BuildContext(spec=data.spec, head=head))
    assert not torch.equal(plain.addresses(head.encode_text("PORT:SSH=")[None]), plain.addresses(head.encode_text("port:ssh=")[None]))


def test_all_ones_mask_takes_the_padded_path_to_the_same_result():
    """On a GPU an all-ones mask is not read back (a host sync): the padded path must give
    the unpadded path's result, bit for bit, full forward and decode step."""
    m = memory()
    with torch.no_grad():
        m.blocks["0"].conv.weight.normal_(std=0.3)
    h = torch.randn(2, 9, DIM)
    ids = torch.randint(0, VOCAB, (2, 9))
    ones = torch.ones(2, 9, dtype=torch.long)
    for t in (9, 1):
        assert torch.equal(m.apply_layer(0, h[:, -t:], ids, ones), m.apply_layer(0, h[:, -t:], ids))


def test_the_old_module_path_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    from engram_llm_hash import blocks, telemetry

    sys.modules.pop("engram_llm_hash.memory", None)
    with pytest.warns(DeprecationWarning, match="engram_llm_hash.memories"):
        old = importlib.import_module("engram_llm_hash.memory")
    assert old.EngramHashMemory is EngramHashMemory and old.HybridHashContentMemory is HybridHashContentMemory
    assert old.EngramHashConfig is EngramHashConfig and old.HybridHashContentConfig is HybridHashContentConfig
    assert old.check_layers is blocks.check_layers and old.collision_stats is telemetry.collision_stats
