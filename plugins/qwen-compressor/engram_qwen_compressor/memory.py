"""Deprecated: `mem_encoder` and `reader_encoder` moved to `engram_qwen_compressor.memories`
(one memory per module). This module re-exports them for one release, then goes."""

import warnings

from .memories.mem_encoder import MemEncoder, MemEncoderConfig
from .memories.reader_encoder import ReaderEncoder, ReaderEncoderConfig

__all__ = ["MemEncoder", "MemEncoderConfig", "ReaderEncoder", "ReaderEncoderConfig"]

warnings.warn(
    "engram_qwen_compressor.memory is deprecated and will be removed in the next release: "
    "import MemEncoder, ReaderEncoder and their configs from engram_qwen_compressor.memories",
    DeprecationWarning,
    stacklevel=2,
)
