"""Text → token ids for `digit_kv`: bytes (the default) or a local Hugging Face tokenizer.

The HF path is what lets a pretrained reader (a Qwen2) read the task in its own
vocabulary: `data.tokenizer` names a directory saved by `save_pretrained` (usually the
reader's model directory), or `engram:NAME`, the tokenizer of the general LM made here
(engram_core.lm: the same files its model folder holds; only the BPE is trained if it is
not cached, never the model), and every budget then counts that tokenizer's tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engram_core.config import ConfigError
from engram_core.nn import ByteTokenizer


class TextTokenizer:
    """The few things digit_kv needs: `encode(text)`, `vocab_size`, `pad_id`, `bos_id`, `digest`."""

    name = "byte"

    def __init__(self):
        self._byte = ByteTokenizer()
        self.vocab_size = self._byte.vocab_size
        self.pad_id = self._byte.pad_id
        self.bos_id = self._byte.bos_id
        self.digest = "byte"

    def encode(self, text: str) -> list[int]:
        return self._byte.encode(text)


class HFTextTokenizer(TextTokenizer):
    """`AutoTokenizer.from_pretrained(path)`, no special tokens added when encoding.

    BOS is the tokenizer's BOS, else its EOS (Qwen2 tokenizers have no BOS and start
    documents after `<|endoftext|>`); PAD is its PAD, else the same EOS.
    """

    def __init__(self, path: str, name: str | None = None):
        from transformers import AutoTokenizer

        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError("tokenizer", f"'byte' or a local directory with a saved tokenizer; {path!r} is not a directory")
        try:
            self.tok = AutoTokenizer.from_pretrained(p)
        except Exception as exc:  # a directory without tokenizer files: one line, not a traceback
            raise ConfigError("tokenizer", f"no tokenizer could be loaded from {path!r} ({type(exc).__name__}); "
                                           "save one there with tokenizer.save_pretrained") from None
        self.name = name or str(p)
        special = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if special is None:
            raise ConfigError("tokenizer", f"the tokenizer in {path!r} has neither a BOS nor an EOS token")
        self.bos_id = int(special)
        self.pad_id = int(self.tok.pad_token_id if self.tok.pad_token_id is not None else special)
        self.vocab_size = len(self.tok)
        vocab = sorted(self.tok.get_vocab().items())
        self.digest = hashlib.sha256(json.dumps([vocab, self.bos_id, self.pad_id]).encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))


def make_tokenizer(spec: str, cache_dir=None) -> TextTokenizer:
    """'byte', `engram:NAME` (the general LM's tokenizer, from `cache_dir`) or a local directory."""
    if spec == "byte":
        return TextTokenizer()
    if spec.startswith("engram:"):
        from engram_core.lm import tokenizer_folder

        return HFTextTokenizer(str(tokenizer_folder(spec, cache_dir, key="tokenizer")), name=spec)
    return HFTextTokenizer(spec)
