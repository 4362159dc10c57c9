"""Triton kernels of the Engram lookup: n-gram hash, row gather, row scatter-add.

Imported only where triton is installed (it ships with CUDA builds of torch); the plain
torch code in `hashing.py` / `nn.Embedding` is the CPU path and the reference these are
tested against (`tests/test_llm_hash_kernels.py`, on CPU under ``TRITON_INTERPRET=1``).

- `ngram_hash_kernel`: every order and every head of a block of positions in one
  launch: the multiply-XOR mixes (int64, the same arithmetic as `NgramHasher.mixes`)
  and the rows ``offset + mix % prime``. Out-of-range token ids trip a device assert
  (active under ``TRITON_DEBUG=1``), never an out-of-bounds read.
- `gather_rows_kernel`: table[rows] for all heads at once, written as the concatenated
  row vector (N, H*slot) in the compute dtype (the cast is fused).
- `scatter_add_rows_kernel`: the backward, atomic adds into an fp32 gradient.
- `segment_sum_rows_kernel`: the deterministic backward: over rows sorted once by
  torch.sort, the first entry of each run of equal rows sums the run in a fixed order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ngram_hash_kernel(
    seq_ptr, valid_ptr, canonical_ptr, multipliers_ptr, moduli_ptr, offsets_ptr, order_slot_ptr,
    rows_ptr, mixes_ptr,
    n_positions, seq_len, lo, width, n_ids, sentinel,
    HAS_VALID: tl.constexpr, MAX_ORDER: tl.constexpr, N_ORDERS: tl.constexpr,
    HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat (batch, window position)
    live = n < n_positions
    b = n // width
    t = lo + n % width  # position in the id sequence
    j = tl.arange(0, HEADS_PAD)
    heads = j < HEADS
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    for k in tl.static_range(MAX_ORDER):
        pos = t - k
        inside = live & (pos >= 0)  # before the sequence start: the sentinel id
        tok = tl.load(seq_ptr + b * seq_len + pos, mask=inside, other=0)
        ok = (tok >= 0) & (tok < n_ids)
        tl.device_assert(ok | (inside == 0), "engram: token id out of range of the vocabulary")
        x = tl.load(canonical_ptr + tok, mask=inside & ok, other=0).to(tl.int64)
        if HAS_VALID:
            keep = tl.load(valid_ptr + b * seq_len + pos, mask=inside, other=0)
            inside = inside & (keep != 0)
        x = tl.where(inside, x, sentinel)
        acc = acc ^ (x * tl.load(multipliers_ptr + k))
        slot = tl.load(order_slot_ptr + k)  # which output order k + 1 is, -1: not an order
        if slot >= 0:
            tl.store(mixes_ptr + n * N_ORDERS + slot, acc, mask=live)
            p = tl.load(moduli_ptr + slot * HEADS + j, mask=heads, other=1)
            off = tl.load(offsets_ptr + slot * HEADS + j, mask=heads, other=0)
            rows = acc[:, None] % p[None, :] + off[None, :]  # mixes are >= 0: % is torch.remainder
            at = rows_ptr + n[:, None] * (N_ORDERS * HEADS) + slot * HEADS + j[None, :]
            tl.store(at, rows, mask=live[:, None] & heads[None, :])


@triton.jit
def gather_rows_kernel(table_ptr, rows_ptr, out_ptr, n_reads, slot_dim, table_stride, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = m < n_reads
    s = tl.arange(0, BLOCK_S)
    cols = s < slot_dim
    row = tl.load(rows_ptr + m, mask=live, other=0)
    mask = live[:, None] & cols[None, :]
    vals = tl.load(table_ptr + row[:, None] * table_stride + s[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + m[:, None] * slot_dim + s[None, :], vals.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def scatter_add_rows_kernel(grad_ptr, rows_ptr, out_ptr, n_reads, slot_dim, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    live = m < n_reads
    s = tl.arange(0, BLOCK_S)
    mask = live[:, None] & (s < slot_dim)[None, :]
    row = tl.load(rows_ptr + m, mask=live, other=0)
    g = tl.load(grad_ptr + m[:, None] * slot_dim + s[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + row[:, None] * slot_dim + s[None, :], g, mask=mask)


@triton.jit
def segment_sum_rows_kernel(grad_ptr, sorted_rows_ptr, order_ptr, out_ptr, n_reads, slot_dim, BLOCK_S: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row = tl.load(sorted_rows_ptr + i)
    prev = tl.load(sorted_rows_ptr + i - 1, mask=i > 0, other=-1)
    if (i == 0) | (prev != row):  # the first read of this row sums every read of it, in sorted order
        s = tl.arange(0, BLOCK_S)
        cols = s < slot_dim
        acc = tl.zeros([BLOCK_S], dtype=tl.float32)
        k = i
        more = i < n_reads  # one int1 scalar throughout the loop
        while more:
            src = tl.load(order_ptr + k)
            acc += tl.load(grad_ptr + src * slot_dim + s, mask=cols, other=0.0).to(tl.float32)
            k += 1
            nxt = tl.load(sorted_rows_ptr + k, mask=k < n_reads, other=-1)
            more = (k < n_reads) & (nxt == row)
        tl.store(out_ptr + row * slot_dim + s, acc, mask=cols)
