"""Write a tiny, randomly initialised transformers causal LM to a local directory, so the
`hf_causal_lm` head and `add_engram` can be tried offline (no downloads):

    python -m engram_llm_hash.tiny_hf /tmp/tiny-llama --family llama
    engram-run recipes/exact_match.toml \
        'head={type="hf_causal_lm", model_dir="/tmp/tiny-llama"}' memory.layers=[1]

The vocabulary is 259 ids, so the offline byte tokenizer fits it.
"""

from __future__ import annotations

import argparse


def save_tiny_causal_lm(path, family: str = "llama", vocab_size: int = 259, hidden: int = 64, layers: int = 2, seed: int = 0):
    import torch
    import transformers

    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    if family not in classes:
        raise SystemExit(f"family must be one of {', '.join(classes)}, got {family!r}")
    conf = classes[family](
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=257, eos_token_id=258, pad_token_id=256,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(conf)
    model.save_pretrained(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="write a tiny random causal LM (byte vocabulary) to DIR")
    p.add_argument("dir")
    p.add_argument("--family", default="llama", help="llama, qwen2 or mistral")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    a = p.parse_args(argv)
    save_tiny_causal_lm(a.dir, a.family, hidden=a.hidden, layers=a.layers)
    print(f"saved a tiny {a.family} to {a.dir}")


if __name__ == "__main__":
    main()
