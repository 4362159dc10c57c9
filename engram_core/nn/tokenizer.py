"""A byte-level tokenizer that works offline: ids 0..255 are bytes, then specials."""

from __future__ import annotations

import torch


class ByteTokenizer:
    """UTF-8 bytes as tokens, plus PAD, BOS and EOS. `vocab_size` = 259."""

    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if i == self.eos_id:
                break
            if 0 <= i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def batch(self, texts: list[str], bos: bool = True, pad_left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention_mask) padded to the longest text."""
        seqs = [self.encode(t, bos=bos) for t in texts]
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            if pad_left:
                ids[i, n - len(s):] = torch.tensor(s)
                mask[i, n - len(s):] = 1
            else:
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
        return ids, mask
