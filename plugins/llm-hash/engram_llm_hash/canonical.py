"""Canonical ids of a transformers tokenizer's vocabulary (the Engram demo's compressed tokenizer).

Each token is decoded on its own, passed through the tokenizer's own normaliser (if its
backend has one) and then through the compression pipeline of the `tokenizers` library:

    NFKC → NFD → strip accents → lower case → runs of whitespace to one space → strip
    (a token that is only whitespace stays " ")

Tokens with the same result share one canonical id. A token whose text on its own is not
valid UTF-8 (a byte-level BPE's partial multi-byte pieces, a byte-fallback `<0xE2>`
token: it decodes to U+FFFD) is keyed by its raw token string instead, so byte tokens
stay distinct (decoding alone would merge them all into "\\ufffd"). Special tokens and
ids past the tokenizer's length keep an id of their own.
"""

from __future__ import annotations

import torch

REPLACEMENT = "\ufffd"


def compression_normalizer():
    """The `tokenizers` normaliser sequence that decides which tokens merge."""
    from tokenizers import Regex, normalizers

    sentinel = "\ue000"  # keeps an all-whitespace token as one space through Strip()
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), sentinel),
            normalizers.Strip(),
            normalizers.Replace(sentinel, " "),
        ]
    )


def tokenizer_canonical_ids(tokenizer, vocab_size: int | None = None) -> torch.Tensor:
    """(vocab_size,) long: the canonical id of every token id, densely numbered."""
    vocab_size = len(tokenizer) if vocab_size is None else int(vocab_size)
    known = min(vocab_size, len(tokenizer))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    own = getattr(getattr(tokenizer, "backend_tokenizer", None), "normalizer", None)
    squash = compression_normalizer()
    texts = tokenizer.batch_decode([[i] for i in range(known)], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    raw = tokenizer.convert_ids_to_tokens(list(range(known)))
    keys: dict[object, int] = {}
    out = []
    for i in range(vocab_size):
        if i >= known or i in special:
            key: object = ("own", i)
        elif REPLACEMENT in texts[i]:
            key = ("raw", raw[i])
        else:
            text = own.normalize_str(texts[i]) if own is not None else texts[i]
            norm = squash.normalize_str(text)
            key = norm if norm else texts[i]
        out.append(keys.setdefault(key, len(keys)))
    return torch.tensor(out, dtype=torch.long, device="cpu")  # host data, also under a meta-device build


def compression_ratio(canonical: torch.Tensor) -> float:
    """Vocabulary size / distinct canonical ids."""
    return canonical.numel() / (int(canonical.max()) + 1)
