"""Context memories: K vectors written from the removed tokens, read by the reader as a
prefix. One memory per module, named after its registered type:

`mem_encoder`     a small Perceiver-style encoder of the removed tokens (K learned queries);
`reader_encoder`  the reader itself, with its own LoRA adapter, writes the K vectors (ICAE);
`token_select`    a learned scorer keeps k removed tokens, read as the reader's own tokens;
`gather`          no parameters: the reader's embeddings at the rigid template's value
                  positions (the baseline of the slot-target warm start).

Shared parts (the reader's width, the `context` point, the stats) are in `base`.
"""

from .gather import Gather, GatherConfig
from .mem_encoder import MemEncoder, MemEncoderConfig
from .reader_encoder import ReaderEncoder, ReaderEncoderConfig
from .token_select import TokenSelect, TokenSelectConfig

__all__ = ["Gather", "GatherConfig", "MemEncoder", "MemEncoderConfig", "ReaderEncoder", "ReaderEncoderConfig", "TokenSelect", "TokenSelectConfig"]
