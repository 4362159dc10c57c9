"""Deprecated: this module was split (one memory per module). The memories are in
`engram_llm_hash.memories` (`engram_hash`, `hybrid_hash_content`); their configs, the
blocks and their helpers in `engram_llm_hash.blocks`; `collision_stats` in
`engram_llm_hash.telemetry`. This module re-exports them for one release, then goes."""

import warnings

from .blocks import (
    GATES,
    EngramBlock,
    EngramHashConfig,
    HybridBlock,
    HybridHashContentConfig,
    RMSNorm,
    build_canonical,
    check_layers,
    memory_dims,
)
from .memories.engram_hash import EngramHashMemory
from .memories.hybrid_hash_content import HybridHashContentMemory
from .telemetry import collision_stats

__all__ = [
    "GATES",
    "EngramBlock",
    "EngramHashConfig",
    "EngramHashMemory",
    "HybridBlock",
    "HybridHashContentConfig",
    "HybridHashContentMemory",
    "RMSNorm",
    "build_canonical",
    "check_layers",
    "collision_stats",
    "memory_dims",
]

warnings.warn(
    "engram_llm_hash.memory is deprecated and will be removed in the next release: import the memories and "
    "their configs from engram_llm_hash.memories (or the package), blocks and helpers from engram_llm_hash.blocks",
    DeprecationWarning,
    stacklevel=2,
)
