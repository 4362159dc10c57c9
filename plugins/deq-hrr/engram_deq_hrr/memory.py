"""Deprecated: the `hrr` memory moved to `engram_deq_hrr.memories` (one memory per module,
`memories/hrr.py`). This module re-exports it for one release, then goes."""

import warnings

from .memories.hrr import HRRMemory, HRRMemoryConfig

__all__ = ["HRRMemory", "HRRMemoryConfig"]

warnings.warn(
    "engram_deq_hrr.memory is deprecated and will be removed in the next release: "
    "import HRRMemory and HRRMemoryConfig from engram_deq_hrr.memories",
    DeprecationWarning,
    stacklevel=2,
)
