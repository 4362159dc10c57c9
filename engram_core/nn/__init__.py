"""Building blocks shared by plugins: Gaussian NLL, soft top-k retrieval, a small
causal transformer, a byte-level tokenizer. Plain modules and functions."""

from .gaussian import diagonal_gaussian_nll_per_item, gaussian_nll
from .retrieval import soft_topk, soft_topk_weights
from .tokenizer import ByteTokenizer
from .transformer import CausalTransformer, CausalTransformerConfig

__all__ = [
    "gaussian_nll",
    "diagonal_gaussian_nll_per_item",
    "soft_topk",
    "soft_topk_weights",
    "CausalTransformer",
    "CausalTransformerConfig",
    "ByteTokenizer",
]


def __getattr__(name: str):
    if name == "ShardedEmbedding":  # moved to engram_core.tables.sharded_rows; the earlier name works for one release
        import importlib
        import warnings

        warnings.warn("engram_core.nn.ShardedEmbedding moved to engram_core.tables.sharded_rows.ShardedEmbedding", DeprecationWarning, stacklevel=2)
        return importlib.import_module("engram_core.tables.sharded_rows").ShardedEmbedding
    raise AttributeError(f"module 'engram_core.nn' has no attribute {name!r}")
