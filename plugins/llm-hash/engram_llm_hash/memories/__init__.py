"""llm-hash's memories, one per module (named after the registered type):

`engram_hash`          hashed suffix n-grams, one table per chosen decoder layer, a gated residual;
`hybrid_hash_content`  engram_hash plus content retrieval of the table rows nearest the hidden state.

Their configs and the per-layer blocks they are made of live in `engram_llm_hash.blocks`
(re-exported here with the memories).
"""

from ..blocks import EngramHashConfig, HybridHashContentConfig
from .engram_hash import EngramHashMemory
from .hybrid_hash_content import HybridHashContentMemory

__all__ = ["EngramHashConfig", "EngramHashMemory", "HybridHashContentConfig", "HybridHashContentMemory"]
