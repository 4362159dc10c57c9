"""A byte-level BPE trained on the corpus's train split, and the three splits as token streams.

One cached artefact (plugin "lm", kind "stdlib_tokens"): a folder with the tokenizer
(`PreTrainedTokenizerFast.save_pretrained`, what a downloaded checkpoint ships) and, per
split, the concatenated token ids (files joined by the end-of-text token) and the UTF-8
bytes of each token, so perplexity can be given per byte as well as per token.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import numpy as np
import torch

from .. import cache
from ..config import field, positive
from . import corpus as corpus_module
from .corpus import SPLITS, CorpusConfig, corpus_digest, corpus_files, read_text

VERSION = 1
SPECIALS = ("<pad>", "<s>", "</s>")


@attrs.frozen
class TokensConfig:
    """The corpus and the BPE vocabulary trained on its train split."""

    vocab_size: int = field(2048, help="BPE vocabulary, 3 special ids included", validator=positive)
    corpus: CorpusConfig = field(factory=CorpusConfig, help="which standard-library files")


@attrs.frozen
class TokenizedCorpus:
    tokenizer: object  # transformers.PreTrainedTokenizerFast
    streams: dict  # split -> LongTensor (n,)
    token_bytes: torch.Tensor  # (vocab,) UTF-8 bytes each id stands for (0 for specials)
    folder: Path | None = None

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)


def train_tokenizer(texts, vocab_size: int):
    """A byte-level BPE (the `tokenizers` library) as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def bytes_per_token(tokenizer) -> torch.Tensor:
    """How many UTF-8 bytes each id stands for. Exact for a byte-level BPE: each character of a
    piece is one byte in GPT-2's byte-to-character map. Special ids count 0."""
    out = torch.zeros(len(tokenizer), dtype=torch.long)
    specials = set(tokenizer.all_special_ids)
    for piece, i in tokenizer.get_vocab().items():
        if i not in specials:
            out[i] = len(piece)
    return out


def encode_split(tokenizer, texts: list[str]) -> torch.Tensor:
    """The split as one stream: each file's ids, then the end-of-text id."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(np.asarray(ids, dtype=np.int64))


def cache_entry(cfg: TokensConfig, cache_dir) -> cache.Entry:
    return cache.entry(cache_dir, plugin="lm", kind="stdlib_tokens", config=cfg, seed=None, version=VERSION,
                       builder=[corpus_module, train_tokenizer, bytes_per_token, encode_split],
                       ext="tokens", inputs={"corpus": corpus_digest(cfg.corpus)})


def load_tokens(cfg: TokensConfig, cache_dir) -> TokenizedCorpus:
    """Build (train the tokenizer, encode the splits) or load the cached artefact."""

    def build():
        files = corpus_files(cfg.corpus)
        texts = {s: [read_text(p) for p in files[s]] for s in SPLITS}
        tok = train_tokenizer(texts["train"], cfg.vocab_size)
        return TokenizedCorpus(tok, {s: encode_split(tok, texts[s]) for s in SPLITS}, bytes_per_token(tok))

    return cache.load_or_build(cache_entry(cfg, cache_dir), build, save_fn=_save, load_fn=_load)


def _save(tc: TokenizedCorpus, folder: Path) -> None:
    folder.mkdir(parents=True)
    tc.tokenizer.save_pretrained(str(folder / "tokenizer"))
    torch.save({"streams": tc.streams, "token_bytes": tc.token_bytes}, folder / "streams.pt")
    counts = {s: int(v.numel()) for s, v in tc.streams.items()}
    (folder / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")


def _load(folder: Path) -> TokenizedCorpus:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    data = torch.load(folder / "streams.pt", weights_only=True)
    return TokenizedCorpus(tok, data["streams"], data["token_bytes"], folder)
