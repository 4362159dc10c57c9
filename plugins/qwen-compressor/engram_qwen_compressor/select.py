"""Deprecated: `token_select` moved to `engram_qwen_compressor.memories` (one memory per
module, `memories/token_select.py`). This module re-exports it for one release, then goes."""

import warnings

from .memories.token_select import TokenSelect, TokenSelectConfig

__all__ = ["TokenSelect", "TokenSelectConfig"]

warnings.warn(
    "engram_qwen_compressor.select is deprecated and will be removed in the next release: "
    "import TokenSelect and TokenSelectConfig from engram_qwen_compressor.memories",
    DeprecationWarning,
    stacklevel=2,
)
