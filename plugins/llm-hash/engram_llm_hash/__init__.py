"""engram plugin llm-hash: hashed n-gram Engram memory inside a causal LM.

Components: data `exact_match`, `long_recall`; heads `tiny_causal_lm`, `hf_causal_lm`;
memories `engram_hash`, `hybrid_hash_content`; objective `completion_ce`; metric
`exact_match`. Package API for transformers models: `add_engram`, `save_engram`,
`load_engram`, `from_pretrained`, `engram_param_groups`, `engram_optimizer`, `engram_memory`.
"""

from .hashing import NgramHasher, canonical_map
from .hf import (
    add_engram,
    engram_memory,
    engram_optimizer,
    engram_param_groups,
    from_pretrained,
    load_engram,
    remove_engram,
    save_engram,
)
from .memories import EngramHashConfig, EngramHashMemory, HybridHashContentConfig, HybridHashContentMemory

__all__ = [
    "NgramHasher",
    "canonical_map",
    "add_engram",
    "engram_param_groups",
    "engram_optimizer",
    "engram_memory",
    "from_pretrained",
    "save_engram",
    "load_engram",
    "remove_engram",
    "EngramHashConfig",
    "EngramHashMemory",
    "HybridHashContentConfig",
    "HybridHashContentMemory",
]
