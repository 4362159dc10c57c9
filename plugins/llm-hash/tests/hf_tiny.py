"""Tiny random transformers causal LMs of five families, for the HF workflow tests."""

import torch
import transformers

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3")
VOCAB = 128
PAD = 2


def tiny_config(family: str, vocab: int = VOCAB, layers: int = 2):
    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=1, bos_token_id=0, pad_token_id=PAD,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=None, **common)
    if family == "gemma":  # tied embeddings, scaled inputs, GeGLU, explicit head_dim
        return transformers.GemmaConfig(head_dim=8, **common)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return transformers.Phi3Config(**common)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family, **kw)).eval()


def padded_batch(lengths, side: str = "left", seed: int = 0, vocab: int = VOCAB):
    """Random prompts of the given lengths, padded to the longest on `side`; also the
    unpadded prompts, one tensor each."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, vocab, (n,), generator=g) for n in lengths]
    n = max(lengths)
    ids = torch.full((len(rows), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return ids, mask, rows


def positions(mask):
    """position_ids for a padded forward (generate makes them itself)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
