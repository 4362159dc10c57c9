"""deq-hrr's memories, one per module (named after the registered type): `hrr`, the
holographic trace (the HRR algebra itself is `engram_deq_hrr.hrr`)."""

from .hrr import HRRMemory, HRRMemoryConfig

__all__ = ["HRRMemory", "HRRMemoryConfig"]
