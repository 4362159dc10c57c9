"""Small builders shared by this plugin's tests."""

import torch
from engram_llm_hash.data import ExactMatchConfig, ExactMatchDataset
from engram_llm_hash.heads import TinyCausalLMConfig, TinyCausalLMHead
from engram_llm_hash.hf import _DimsOnly
from engram_llm_hash.memories import EngramHashConfig, EngramHashMemory

from engram_core.components import BuildContext, Model

DIM, VOCAB, LAYERS = 16, 50, 2


def dims_build():
    return BuildContext(head=_DimsOnly(DIM, VOCAB, LAYERS))


def memory(**kw):
    kw.setdefault("memory_size", 997)
    kw.setdefault("layers", [0])
    kw.setdefault("heads_per_order", 2)
    kw.setdefault("slot_dim", 4)
    return EngramHashMemory(EngramHashConfig(**kw), dims_build())


def perturb(module, scale=0.5, seed=0):
    """Give every parameter of a (memory) module random non-zero values: 'trained'."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def tiny_model(tmp_path, memory_cls=EngramHashMemory, memory_cfg=None, **data_kw):
    data_kw.setdefault("n_synthetic", 40)
    data = ExactMatchDataset(ExactMatchConfig(categories=["synthetic", "port"], **data_kw), BuildContext(cache_dir=tmp_path))
    head = TinyCausalLMHead(TinyCausalLMConfig(dim=32, n_layers=2, n_heads=2), BuildContext(spec=data.spec))
    mem = None
    if memory_cfg is not None:
        mem = memory_cls(memory_cfg, BuildContext(spec=data.spec, head=head))
    return data, head, mem, Model(head, mem, "layer")
