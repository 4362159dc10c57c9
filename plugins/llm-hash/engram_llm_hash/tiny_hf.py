"""Write a tiny, randomly initialised transformers causal LM to a local directory, so the
`hf_causal_lm` head, `add_engram` and `recipes/hf_exact_match.toml` can be tried offline
(no downloads):

    python -m engram_llm_hash.tiny_hf models/tiny-llama                      # byte vocabulary (259 ids)
    python -m engram_llm_hash.tiny_hf models/tiny-llama-bpe --tokenizer bpe  # + a trained byte-level BPE
    engram-run recipes/hf_exact_match.toml head.model_dir=models/tiny-llama

With `--tokenizer bpe` a byte-level BPE (the `tokenizers` library) is trained on the
exact-match tables shipped with the package and saved beside the weights, so the
directory is what a real checkpoint is: model + its own tokenizer (`data.tokenizer` may
name the directory). Its vocabulary is the model's.
"""

from __future__ import annotations

import argparse
from importlib import resources

FAMILIES = ("llama", "qwen2", "mistral")


def table_corpus() -> list[str]:
    """Lines of text from the package's exact-match tables, in a few casings."""
    lines = []
    for f in sorted(resources.files("engram_llm_hash").joinpath("tables").iterdir()):
        if not f.name.endswith(".tsv"):
            continue
        kind = f.name[:-4].upper()
        for row in f.read_text(encoding="utf-8").splitlines():
            cells = [c for c in row.split("\t") if c]
            if not cells:
                continue
            text = f"{kind}:{cells[0]}=" + " ".join(cells[1:])
            lines += [text, text.lower(), text.upper(), " " + text]
    return lines


def train_byte_level_bpe(vocab_size: int):
    """A byte-level BPE of `vocab_size` ids (3 specials: <pad>, <s>, </s>) trained on the
    tables, as a transformers fast tokenizer (engram_core.lm's trainer, the general LM's own)."""
    from engram_core.lm.tokens import train_tokenizer

    return train_tokenizer(table_corpus(), vocab_size)


def save_tiny_causal_lm(path, family: str = "llama", vocab_size: int | None = None, hidden: int = 64, layers: int = 2, seed: int = 0, tokenizer: str = "byte"):
    import torch
    import transformers

    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    if family not in classes:
        raise SystemExit(f"family must be one of {', '.join(classes)}, got {family!r}")
    if tokenizer not in ("byte", "bpe"):
        raise SystemExit(f"tokenizer must be 'byte' or 'bpe', got {tokenizer!r}")
    if tokenizer == "bpe":
        tok = train_byte_level_bpe(vocab_size or 512)
        vocab_size = len(tok)
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    else:
        tok = None
        vocab_size = vocab_size or 259
        ids = dict(bos_token_id=257, eos_token_id=258, pad_token_id=256)
    extra = {"sliding_window": None} if family == "mistral" else {}
    conf = classes[family](
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, **ids, **extra,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(conf)
    model.save_pretrained(path)
    if tok is not None:
        tok.save_pretrained(path)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description="write a tiny random causal LM to DIR (byte vocabulary, or a trained byte-level BPE)")
    p.add_argument("dir")
    p.add_argument("--family", default="llama", help="llama, qwen2 or mistral")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tokenizer", default="byte", help="'byte' (259 ids, the offline byte tokenizer) or 'bpe' (trained here, saved beside the weights)")
    p.add_argument("--vocab", type=int, default=None, help="BPE vocabulary size (default 512)")
    a = p.parse_args(argv)
    save_tiny_causal_lm(a.dir, a.family, vocab_size=a.vocab, hidden=a.hidden, layers=a.layers, tokenizer=a.tokenizer)
    print(f"saved a tiny {a.family} ({a.tokenizer} tokenizer) to {a.dir}")


if __name__ == "__main__":
    main()
