"""engram plugin `qwen-compressor`: compress the removed part of a prompt into K latent
vectors that a causal LM reader consumes as prefix embeddings (seed 003, "Latentem")."""

__version__ = "0.1.0"
