"""Building blocks shared by plugins: Gaussian NLL, soft top-k retrieval, a small
causal transformer, a byte-level tokenizer. Plain modules and functions."""

from ..tables.sharded_rows import ShardedEmbedding  # re-exported: its earlier public path
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
    "ShardedEmbedding",
]
