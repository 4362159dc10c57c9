"""Deterministic n-gram addressing, as in the published Engram design (arXiv 2601.07372).

For each position t and each order n, the suffix n-gram (x[t-n+1], ..., x[t]) of
(optionally canonicalised) token ids is mixed with a multiply-XOR hash

    mix_n(t) = (x[t] * m_0) XOR (x[t-1] * m_1) XOR ... XOR (x[t-n+1] * m_{n-1})

with random odd multipliers m_k (small enough that no product overflows int64), and
head j of order n reads row ``offset[n, j] + mix_n(t) mod p[n, j]`` of ONE embedding
table, where the p[n, j] are distinct primes (so the heads of one order collide on
different n-gram pairs). Positions before the sequence start read a sentinel id.

Addresses depend on token ids only: they can be computed before the forward pass,
on any device, and batch items never influence each other.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence

import torch
from torch import nn

from engram_core.run import accel


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    r = int(math.isqrt(n))
    for f in range(3, r + 1, 2):
        if n % f == 0:
            return False
    return True


def next_prime(n: int) -> int:
    n = max(2, n)
    while not is_prime(n):
        n += 1
    return n


def slice_sizes(memory_size: int, n_heads: int) -> list[int]:
    """Rows of each head's slice: distinct primes at or just below memory_size / n_heads
    (so the table never exceeds memory_size), topped up above where too few exist.

    Where the table is smaller than two rows per head (the table-size controls), every
    head shares one slice of `memory_size` rows (offset 0), so ``memory_size = 1`` is a
    single row that every n-gram reads.
    """
    base = memory_size // n_heads
    if base < 2:
        return [memory_size] * n_heads
    sizes: list[int] = []
    p = base
    while len(sizes) < n_heads and p >= 2:
        if is_prime(p):
            sizes.append(p)
        p -= 1
    p = base + 1
    while len(sizes) < n_heads:
        p = next_prime(p)
        sizes.append(p)
        p += 1
    return sizes


def canonical_map(token_texts: Sequence[str | None]) -> torch.Tensor:
    """A many-to-one map of token ids by normalised text (NFKC, lower case, no accents,
    stripped whitespace), as the Engram demo's compressed tokenizer does. Tokens with no
    text (None, specials) keep an id of their own."""
    seen: dict[str, int] = {}
    out = []
    for i, text in enumerate(token_texts):
        if text is None:
            out.append(len(token_texts) + i)  # unique, never merged
            continue
        norm = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text).lower())
        norm = "".join(c for c in norm if not unicodedata.combining(c)).strip()
        if norm == "" and text != "":
            norm = " "  # all-whitespace tokens merge into one
        out.append(seen.setdefault(norm, i))
    # dense re-numbering keeps the multipliers' overflow bound tight
    uniq = {v: k for k, v in enumerate(sorted(set(out)))}
    return torch.tensor([uniq[v] for v in out], dtype=torch.long, device="cpu")  # host data, also under a meta build


def byte_token_texts(vocab_size: int = 259) -> list[str | None]:
    """Texts of the byte tokenizer's ids: printable ASCII bytes as characters, others None."""
    return [chr(i) if 32 <= i < 127 else None for i in range(256)] + [None] * (vocab_size - 256)


class NgramHasher(nn.Module):
    """Addresses (B, T, H) of every position's suffix n-grams; H = len(orders) * heads."""

    def __init__(
        self,
        vocab_size: int,
        memory_size: int,
        orders: Sequence[int] = (2, 3),
        heads_per_order: int = 8,
        seed: int = 0,
        canonical: torch.Tensor | None = None,
    ):
        super().__init__()
        self.orders = tuple(int(n) for n in orders)
        self.max_order = max(self.orders)
        self.heads_per_order = heads_per_order
        self.n_heads = len(self.orders) * heads_per_order
        if canonical is None:  # index tables are host data computed from the config, also under a meta build
            canonical = torch.arange(vocab_size, device="cpu")
        # the sentinel (position before the start) gets the id after the canonical ones
        self.sentinel = int(canonical.max()) + 1
        self.register_buffer("canonical", canonical.long().clone(), persistent=False)
        g = torch.Generator().manual_seed(int(seed))
        bound = (2**62) // (self.sentinel + 1)
        mult = torch.randint(0, max(1, bound // 2), (self.max_order,), generator=g, dtype=torch.long, device="cpu") * 2 + 1
        self.register_buffer("multipliers", mult, persistent=False)
        sizes = slice_sizes(memory_size, self.n_heads)
        shared = len(set(sizes)) == 1 and sizes[0] == memory_size and memory_size // self.n_heads < 2
        offsets = [0] * self.n_heads if shared else [sum(sizes[:j]) for j in range(self.n_heads)]
        self.total_rows = memory_size if shared else sum(sizes)
        self.register_buffer("moduli", torch.tensor(sizes, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long), persistent=False)
        # for k < max_order: which output column order k + 1 is (-1: not an order); the fused kernel's map
        slots = [self.orders.index(k + 1) if (k + 1) in self.orders else -1 for k in range(self.max_order)]
        self.register_buffer("order_slots", torch.tensor(slots, dtype=torch.long), persistent=False)

    def check_ids(self, ids: torch.Tensor) -> None:
        """A clear error for token ids outside the vocabulary. Reads min and max: free on
        CPU tensors, a host synchronisation on a GPU, so the forward checks only CPU ids
        (call this at your data boundary to check GPU ones; the torch path's indexing
        then fails with a device-side assert, the Triton kernel's under TRITON_DEBUG=1)."""
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.canonical.numel()):
            raise ValueError(f"token ids must be in [0, {self.canonical.numel()}), got [{int(ids.min())}, {int(ids.max())}]")

    def mixes(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, len(orders)) int64 multiply-XOR mix of each order's suffix n-gram.
        `valid` (B, T) or None: 0 marks a position that reads as before the sequence start
        (the sentinel), how packed-out padding is kept out of every n-gram."""
        if accel.host_reads_free(ids.device):
            self.check_ids(ids)  # no device synchronisation on CPU
        x = self.canonical[ids]
        if valid is not None:
            x = torch.where(valid.bool(), x, self.sentinel)
        b, t = x.shape
        shifted = [x]
        for k in range(1, self.max_order):
            pad = x.new_full((b, min(k, t)), self.sentinel)
            shifted.append(torch.cat([pad, x[:, : t - k]], dim=1)[:, :t])
        out = []
        acc = shifted[0] * self.multipliers[0]
        for k in range(1, self.max_order + 1):
            if k in self.orders:
                out.append(acc)
            if k < self.max_order:
                acc = torch.bitwise_xor(acc, shifted[k] * self.multipliers[k])
        return torch.stack(out, dim=-1)

    def addresses(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, H) absolute rows of the shared table; head order: order-major."""
        return self.addresses_from_mixes(self.mixes(ids))

    def addresses_from_mixes(self, mix: torch.Tensor) -> torch.Tensor:
        """(..., H) rows from (..., O) mixes (what `mixes` returns)."""
        mix = mix.repeat_interleave(self.heads_per_order, dim=-1)  # (..., H)
        return torch.remainder(mix, self.moduli) + self.offsets
