"""Small shared builders for the qwen-compressor tests (tiny configs, CPU, seconds)."""

from __future__ import annotations

import torch
from engram_qwen_compressor.data import DigitKVConfig, DigitKVDataset
from engram_qwen_compressor.memories import MemEncoder, MemEncoderConfig
from engram_qwen_compressor.reader import CompressorReader, ReaderConfig

from engram_core.components import BuildContext, Model

_DATA_CACHE: dict = {}


def small_data(tmp_path=None, **kw) -> DigitKVDataset:
    cfg = DigitKVConfig(**{"n_train": 64, "n_eval": 32, "budgets": [64], **kw})
    key = (repr(cfg), str(tmp_path))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = DigitKVDataset(cfg, BuildContext(cache_dir=tmp_path) if tmp_path else None)
    return _DATA_CACHE[key]


def small_model(ds=None, memory=True, reader_kw=None, memory_kw=None, seed=0):
    ds = ds or small_data()
    torch.manual_seed(seed)
    build = BuildContext(spec=ds.spec, dataset=ds)
    head = CompressorReader(ReaderConfig(**{"dim": 32, "n_layers": 1, "n_heads": 2, **(reader_kw or {})}), build)
    build.head = head
    mem = MemEncoder(MemEncoderConfig(**{"dim": 32, "n_heads": 2, "n_cross_layers": 1, **(memory_kw or {})}), build) if memory else None
    return Model(head, mem, "context" if mem is not None else None), build


def batch(ds, n=4, seed=0, budget=None):
    return ds.sample("train", n, torch.Generator().manual_seed(seed), budget=budget)


def save_tiny_tokenizer(path):
    """A tiny byte-level BPE trained here on digit_kv text (every template, every key), digits
    split one by one as in Qwen2's pre-tokenizer, with `<|endoftext|>` as EOS/PAD; saved with
    save_pretrained so `AutoTokenizer.from_pretrained(path)` loads it (no download)."""
    from engram_qwen_compressor.data import QUESTION, TEMPLATES
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t.format(k=f"{k:02d}", v=k % 10) for t in TEMPLATES for k in range(100)]
    texts += [QUESTION.format(k=f"{k:02d}") for k in range(100)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def save_tiny_qwen2(path, vocab: int, tokenizer: bool = False):
    """A random Qwen2 (hidden 32, 2 layers) saved to `path`, with the tiny tokenizer beside it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if tokenizer:
        vocab = len(save_tiny_tokenizer(path))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path
