"""Building blocks shared by plugins: Gaussian NLL, soft top-k retrieval, a small
causal transformer, a byte-level tokenizer. Plain modules and functions."""

from .gaussian import gaussian_nll, diagonal_gaussian_nll_per_item
from .retrieval import soft_topk, soft_topk_weights
from .transformer import CausalTransformer, CausalTransformerConfig
from .tokenizer import ByteTokenizer

__all__ = [
    "gaussian_nll",
    "diagonal_gaussian_nll_per_item",
    "soft_topk",
    "soft_topk_weights",
    "CausalTransformer",
    "CausalTransformerConfig",
    "ByteTokenizer",
]
