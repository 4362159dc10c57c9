"""Which code runs the Engram lookup (hash → gather, and the gather's backward), and the
fused Triton versions as torch operators.

`memory.kernels` chooses:

    "auto"    Triton on CUDA tensors where triton imports, the torch code otherwise
    "torch"   always the torch code (the CPU path and the reference)
    "triton"  always Triton; an error at build time where triton is not installed

The torch path is `NgramHasher.mixes` / `addresses_from_mixes` and `nn.Embedding`, as
before. The Triton path is three operators registered with `torch.library.triton_op`
(public since torch 2.6), so eager calls launch the kernels directly and
`torch.compile` sees them as operators (no graph break) with their autograd formula:

    engram_llm_hash::ngram_hash     ids → (rows, mixes) for every order and head, one launch
    engram_llm_hash::gather_rows    table[rows] → the concatenated (N, H*slot) vector, one launch
    engram_llm_hash::scatter_rows   its backward: atomic scatter-add, or a sorted segment
                                    sum when `torch.use_deterministic_algorithms(True)`

Nothing here synchronises with the host. Tables whose gradient is made as rows (`sparse =
true`, or a row-wise optimiser updating them in backward, the CUDA default) keep
`nn.Embedding`'s gather with its sparse gradient, and use the fused hash.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from engram_core.config import ConfigError

KERNELS = ("auto", "torch", "triton")


TRITON_FOUND = importlib.util.find_spec("triton") is not None  # looked up once: the forward asks at every call


def triton_available() -> bool:
    return TRITON_FOUND


def interpreting() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors: how
    they are tested without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def check_kernels(choice: str) -> None:
    """Build-time check of `memory.kernels` (the config validator has checked the name)."""
    if choice == "triton" and not triton_available():
        raise ConfigError(
            "kernels", "'triton' needs the triton package (it ships with CUDA builds of torch; pip install triton); use 'auto' or 'torch'"
        )


def use_triton(choice: str, device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on `device`: "auto" on CUDA only;
    "triton" on CUDA, or on CPU under Triton's interpreter (the tests)."""
    if choice == "torch" or not triton_available():
        return False
    if device.type == "cuda":
        return True
    if choice == "triton":
        if device.type == "cpu" and interpreting():
            # the interpreter's kernels are plain Python, which torch.compile cannot trace
            # as operators: a compiled CPU graph takes the torch code
            return not torch.compiler.is_compiling()
        raise ConfigError(
            "kernels", f"'triton' runs on CUDA tensors, these are on {device.type} (TRITON_INTERPRET=1 runs them on CPU, slowly); use 'auto' or 'torch'"
        )
    return False


# --------------------------------------------------------------------------- torch path
def hash_window_torch(hasher, seq: torch.Tensor, lo: int, hi: int, valid: torch.Tensor | None = None):
    """(rows (B, W, H), mixes (B, W, O)) of positions [lo, hi) of `seq` (B, L); `valid`
    (B, L) 0 = a position that reads as before the sequence start (packed-out padding)."""
    hash_lo = max(0, lo - (hasher.max_order - 1))
    window_valid = valid[:, hash_lo:hi] if valid is not None else None
    mixes = hasher.mixes(seq[:, hash_lo:hi], valid=window_valid)[:, lo - hash_lo :]
    return hasher.addresses_from_mixes(mixes), mixes


# -------------------------------------------------------------------------- triton path
def _register_ops():
    """The three operators; defined once, only where triton imports."""
    import triton
    from torch.library import triton_op, wrap_triton

    from . import triton_kernels as tk

    @triton_op("engram_llm_hash::ngram_hash", mutates_args=())
    def ngram_hash(
        seq: torch.Tensor, valid: torch.Tensor | None, canonical: torch.Tensor, multipliers: torch.Tensor, moduli: torch.Tensor,
        offsets: torch.Tensor, order_slots: torch.Tensor, lo: int, hi: int, sentinel: int, heads_per_order: int, n_orders: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, seq_len = seq.shape
        width = hi - lo
        n = b * width
        heads = n_orders * heads_per_order
        rows = torch.empty((b, width, heads), dtype=torch.long, device=seq.device)
        mixes = torch.empty((b, width, n_orders), dtype=torch.long, device=seq.device)
        block = 128
        wrap_triton(tk.ngram_hash_kernel)[(triton.cdiv(n, block),)](
            seq, valid if valid is not None else seq, canonical, multipliers, moduli, offsets, order_slots, rows, mixes,
            n, seq_len, lo, width, canonical.numel(), sentinel,
            HAS_VALID=valid is not None, MAX_ORDER=multipliers.numel(), N_ORDERS=n_orders,
            HEADS=heads_per_order, HEADS_PAD=triton.next_power_of_2(heads_per_order), BLOCK=block,
        )
        return rows, mixes

    @triton_op("engram_llm_hash::gather_rows", mutates_args=())
    def gather_rows(table: torch.Tensor, rows: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        slot = table.shape[1]
        flat = rows.reshape(-1)
        out = torch.empty((flat.numel(), slot), dtype=out_dtype, device=table.device)
        block_s = triton.next_power_of_2(slot)
        block_m = max(1, 4096 // block_s)
        wrap_triton(tk.gather_rows_kernel)[(triton.cdiv(flat.numel(), block_m),)](
            table, flat, out, flat.numel(), slot, table.stride(0), BLOCK_M=block_m, BLOCK_S=block_s
        )
        return out.view(*rows.shape[:-1], rows.shape[-1] * slot)

    @triton_op("engram_llm_hash::scatter_rows", mutates_args=())
    def scatter_rows(grad: torch.Tensor, rows: torch.Tensor, n_rows: int, table_dtype: torch.dtype, deterministic: bool) -> torch.Tensor:
        flat = rows.reshape(-1)
        slot = grad.shape[-1] // rows.shape[-1]
        grad = grad.reshape(flat.numel(), slot).contiguous()
        out = torch.zeros((n_rows, slot), dtype=torch.float32, device=grad.device)
        block_s = triton.next_power_of_2(slot)
        if deterministic:
            sorted_rows, order = torch.sort(flat, stable=True)
            wrap_triton(tk.segment_sum_rows_kernel)[(flat.numel(),)](grad, sorted_rows, order, out, flat.numel(), slot, BLOCK_S=block_s)
        else:
            block_m = max(1, 4096 // block_s)
            wrap_triton(tk.scatter_add_rows_kernel)[(triton.cdiv(flat.numel(), block_m),)](
                grad, flat, out, flat.numel(), slot, BLOCK_M=block_m, BLOCK_S=block_s
            )
        return out if table_dtype == torch.float32 else out.to(table_dtype)

    def gather_setup(ctx, inputs, output):
        table, rows, _ = inputs
        ctx.save_for_backward(rows)
        ctx.n_rows = table.shape[0]
        ctx.table_dtype = table.dtype

    def gather_backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        det = torch.are_deterministic_algorithms_enabled()
        return scatter_rows(grad.contiguous(), rows, ctx.n_rows, ctx.table_dtype, det), None, None

    gather_rows.register_autograd(gather_backward, setup_context=gather_setup)
    return ngram_hash, gather_rows, scatter_rows


_OPS: tuple | None = None


def triton_ops():
    """(ngram_hash, gather_rows, scatter_rows) operators, registered on first use. A block
    that may use them registers them when it is built (`prepare`), outside any
    torch.compile trace: registration itself cannot be traced."""
    global _OPS
    if _OPS is None:
        _OPS = _register_ops()
    return _OPS


def prepare(choice: str) -> None:
    """Build-time: check the choice and, where Triton may run, register its operators."""
    check_kernels(choice)
    may_run = choice == "triton" or torch.cuda.is_available()  # "auto" runs Triton on CUDA only
    if choice != "torch" and triton_available() and may_run:
        triton_ops()


def hash_window_triton(hasher, seq: torch.Tensor, lo: int, hi: int, valid: torch.Tensor | None = None):
    """As `hash_window_torch`, one kernel launch."""
    ngram_hash = triton_ops()[0]
    return ngram_hash(
        seq.contiguous(), valid.contiguous() if valid is not None else None, hasher.canonical, hasher.multipliers, hasher.moduli,
        hasher.offsets, hasher.order_slots, int(lo), int(hi), int(hasher.sentinel), int(hasher.heads_per_order), len(hasher.orders),
    )


def gather_rows_triton(table: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """table[rows] concatenated over the last axis of rows: (..., H) → (..., H*slot) in `dtype`."""
    return triton_ops()[1](table.contiguous() if table.stride(-1) != 1 else table, rows.contiguous(), dtype)


def scatter_rows_triton(grad: torch.Tensor, rows: torch.Tensor, n_rows: int, table_dtype: torch.dtype, deterministic: bool) -> torch.Tensor:
    """The gather's backward on its own (tests and benchmarks): the dense table gradient."""
    return triton_ops()[2](grad.contiguous(), rows.contiguous(), n_rows, table_dtype, deterministic)
