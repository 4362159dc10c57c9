"""A row-sharded embedding table: under torch.distributed each rank owns a contiguous range of
rows (and, through the optimiser, their state); on one process it is an ordinary table.

    table = ShardedEmbedding(num_rows, dim)     # inside a model every rank builds alike
    rows = table(ids)                           # ids of any shape -> ids.shape + (dim,)
    make_row_table("sharded", num_rows, dim)    # the same, as the row-table placement 'sharded'

Ownership is the `torch.chunk` layout (the layout of a DTensor `Shard(0)`, which the sharded
checkpoint uses): with `per = ceil(num_rows / world)`, rank r owns rows [r*per, (r+1)*per).

A lookup on N ranks (`RouteRows`, a custom autograd Function):

    1. each rank deduplicates its ids (`torch.unique`, sorted, hence grouped by owner);
    2. header all-to-all: per peer (active flag, table id, number of ids asked);
    3. ids all-to-all: each owner receives the ids it is asked for;
    4. the owner gathers those rows of its shard; rows all-to-all back;
    5. each rank expands its unique rows to its positions (`inverse`).

Backward runs the route in reverse: the gradient of each unique row is summed on the
requester, divided by the world size (DDP averages the ranks' gradients, so the table's
gradient is the same mean), sent to the owner with one all-to-all and summed into the
owner's shard. Per step and table, with U_r the unique ids of rank r and D the row width:

    sent by rank r = 8*U_r (ids) + 2 * U_r * D * bytes_per_value (rows out, gradients back)

plus 24*N bytes of headers (docs/plugins/llm-hash.md). The table's parameter is listed in
`self_managed_parameters()`, so the engine leaves it out of DDP.

Collectives must match across ranks. Training is in lockstep; an evaluation gives ranks
unequal numbers of batches, so a rank that finished its block calls `serve_peers()` (the
engine does, after each metric), answering the others' lookups until every rank is done.
All tables of a process share one process group, and each round names its table, so a
rank serving peers answers whichever table they read.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..run import distributed
from .device_rows import read_rows_eagerly
from .rowwise import reading_rows, wants_row_gradients

# rows drawn per slice at initialisation: a multiple of 16 values per slice keeps the CPU
# normal_ stream of the slices identical to one normal_ over the whole table
_INIT_ROWS = 1 << 16

_group = None  # the process group all sharded tables of this process route through
_tables: list[weakref.ref] = []  # every sharded table, by creation order (= table id on every rank)


class ShardedLookupError(RuntimeError):
    """Ranks disagreed on which table a lookup round reads (they ran different models)."""


def _world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def lookup_group():
    """The process group of table lookups (one for all tables, made by every rank on the first
    table it builds): kept apart from the default group, so lookups never interleave with DDP's
    bucketed all-reduces in the same backward."""
    global _group
    if _group is None:
        _group = torch_dist.new_group()
    return _group


def forget_process_group() -> None:
    """Drop the lookup group and the table ids (`distributed.teardown` calls it: `on_leave`)."""
    global _group
    _group = None
    _tables.clear()


class RowRange:
    """Which rows each of `world` ranks owns: contiguous, `ceil(num_rows / world)` a rank."""

    def __init__(self, num_rows: int, rank: int, world: int):
        self.num_rows, self.rank, self.world = num_rows, rank, world
        self.per = -(-num_rows // world)
        self.start = min(rank * self.per, num_rows)
        self.stop = min(self.start + self.per, num_rows)

    @property
    def local_rows(self) -> int:
        return self.stop - self.start

    def counts_by_owner(self, sorted_ids: torch.Tensor) -> torch.Tensor:
        return torch.bincount(sorted_ids // self.per, minlength=self.world)


def _exchange(tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """all_to_all_single with uneven splits along dim 0 (gloo, NCCL and MPI all implement it)."""
    out = tensor.new_empty((sum(recv_counts),) + tuple(tensor.shape[1:]))
    torch_dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=group)
    return out


def _round(table_id: int, active: bool, sorted_ids: torch.Tensor, rows: RowRange, device) -> tuple[torch.Tensor, list[int], list[int], torch.Tensor]:
    """One lookup round's first half, every rank: headers, then ids to their owners.
    Returns (active flags of the peers, ids sent per owner, ids received per peer, received ids)."""
    group = lookup_group()
    world = rows.world
    send = rows.counts_by_owner(sorted_ids) if sorted_ids.numel() else torch.zeros(world, dtype=torch.long, device=device)
    header = torch.stack([torch.full((world,), int(active), dtype=torch.long, device=device),
                          torch.full((world,), table_id, dtype=torch.long, device=device), send.to(device)], 1)
    got = torch.empty_like(header)
    torch_dist.all_to_all_single(got, header, group=group)
    got = got.cpu()  # the split sizes are needed on the host
    flags, tables, recv = got[:, 0], got[:, 1], got[:, 2].tolist()
    asked = {int(t) for f, t in zip(flags.tolist(), tables.tolist()) if f}
    if asked != {table_id}:
        raise ShardedLookupError(f"ranks read different sharded tables in one lookup round ({sorted(asked | {table_id})}): every rank must run the same forward")
    send_counts = send.tolist()
    ids = _exchange(sorted_ids.to(device), send_counts, recv, group)
    return flags, send_counts, recv, ids


def _answer(weight: torch.Tensor, rows: RowRange, recv_ids: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """The owner's half: its rows for the ids it received, sent back; returns the rows this rank asked for."""
    local = recv_ids - rows.start
    return _exchange(weight[local], recv_counts, send_counts, lookup_group())


class RouteRows(torch.autograd.Function):
    """rows = full_table[ids] where each rank holds a shard; see the module docstring."""

    @staticmethod
    def forward(ctx, weight, ids, table):
        rows: RowRange = table.rows
        uniq, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        _, send_counts, recv_counts, recv_ids = _round(table.table_id, True, uniq, rows, weight.device)
        got = _answer(weight.detach(), rows, recv_ids, send_counts, recv_counts)
        ctx.save_for_backward(inverse, recv_ids)
        ctx.counts = (send_counts, recv_counts)
        ctx.meta = (rows, uniq.numel(), table.sparse or reading_rows(weight))
        table.last_unique, table.last_send_counts = uniq.numel(), send_counts
        return got[inverse]

    @staticmethod
    def backward(ctx, grad_out):
        inverse, recv_ids = ctx.saved_tensors
        send_counts, recv_counts = ctx.counts
        rows, n_unique, sparse = ctx.meta
        grad_unique = grad_out.new_zeros((n_unique, grad_out.shape[-1])).index_add_(0, inverse, grad_out)
        grad_unique /= rows.world  # the mean over ranks, as DDP averages every other gradient
        grads = _exchange(grad_unique, send_counts, recv_counts, lookup_group())
        local = recv_ids - rows.start
        if sparse:
            grad = torch.sparse_coo_tensor(local[None], grads, (rows.local_rows, grads.shape[-1]))
        else:
            grad = grads.new_zeros((rows.local_rows, grads.shape[-1])).index_add_(0, local, grads)
        return grad, None, None


def _routed_runs_eagerly() -> None:
    """`torch.compiler.disable` on `ShardedEmbedding._routed` (collectives with data-dependent
    split sizes run eagerly under run.compile), applied when the first sharded table is built
    rather than as a decorator: the decorator imports torch._dynamo (~0.8 s), which commands
    that only list or check components (`engram plugins`, `engram validate`) should not pay."""
    if not getattr(ShardedEmbedding._routed, "_engram_eager", False):
        eager = torch.compiler.disable(ShardedEmbedding._routed)
        eager._engram_eager = True
        ShardedEmbedding._routed = eager


class ShardedEmbedding(nn.Module):
    """`nn.Embedding(num_rows, dim)` whose rows are split over the ranks of torch.distributed.

    `weight` holds this rank's rows only (all of them on one process, where the module is an
    ordinary table: F.embedding, an ordinary state_dict). On N ranks `weight` is left out of
    DDP and out of `state_dict()`: the engine writes it, and its optimiser state, with
    `engram_core.tables.state` (torch.distributed.checkpoint), which loads on any number of
    ranks. `load_state_dict` given the whole table (a one-process checkpoint) keeps this
    rank's rows. Initial rows are N(0, init_std) drawn exactly as one `normal_` over the whole
    table would draw them, so N ranks start from the one-process table."""

    placement = "sharded"

    def __init__(self, num_rows: int, dim: int, init_std: float = 0.02, sparse: bool = False):
        super().__init__()
        rank, world = _world()
        self.num_rows, self.embedding_dim, self.sparse = num_rows, dim, sparse
        self.rows = RowRange(num_rows, rank, world)
        self.weight = nn.Parameter(torch.empty(self.rows.local_rows, dim))
        self.reset_parameters(init_std)
        self.last_unique = 0  # unique ids of the last lookup on this rank (communication telemetry)
        self.last_send_counts: list[int] = []  # ids it sent to each owner
        if self.sharded:
            _routed_runs_eagerly()
            lookup_group()
            self.table_id = len(_tables)
            _tables.append(weakref.ref(self))
            distributed.on_leave(forget_process_group)  # the lookup group must not outlive the run's
            self.register_state_dict_post_hook(_drop_rows_from_state)
            self.register_load_state_dict_pre_hook(_take_own_rows)
            self.register_load_state_dict_post_hook(_rows_come_from_sharded_state)  # e.g. Dist.broadcast_state
        else:
            self.table_id = 0

    @property
    def num_embeddings(self) -> int:  # as nn.Embedding
        return self.num_rows

    @property
    def row_gradients(self) -> bool:
        """Whether this forward's gradient is made as rows (sparse): `sparse=True`, or a
        row-wise optimiser updates the table in backward (engram_core.tables.rowwise)."""
        return self.sparse or wants_row_gradients(self.weight)

    @property
    def sharded(self) -> bool:
        return self.rows.world > 1

    def init_normal_(self, std: float) -> None:
        """N(0, std) rows, the stream one `normal_` over the whole table draws (row-table protocol)."""
        self.reset_parameters(std)

    @property
    def full_weight(self) -> torch.Tensor:
        """Every row: the table itself on one process; on N ranks no rank holds them all."""
        if self.sharded:
            raise ConfigError("placement", f"this action reads every row of the table, but with placement 'sharded' on {self.rows.world} ranks each rank holds only its own rows; run it on one process (engram-run without --nproc) or use placement 'device'")
        return self.weight

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Keep this rank's master rows in `dtype` (reads are cast by the caller)."""
        self.to(dtype)

    def prefetch(self, rows: torch.Tensor) -> None:
        """Nothing ahead of time: the owners are asked during the forward."""

    def stats(self) -> dict[str, float]:
        return {"unique_rows_per_lookup": float(self.last_unique)} if self.sharded else {}

    def reset_parameters(self, std: float) -> None:
        """Draw the whole table's N(0, std) stream slice by slice, keeping the owned rows (memory
        of one slice, time of the whole table on every rank)."""
        with torch.no_grad():
            if not self.sharded:
                nn.init.normal_(self.weight, std=std)
                return
            buf = torch.empty(min(_INIT_ROWS, self.num_rows), self.embedding_dim)
            lo, hi = self.rows.start, self.rows.stop
            for s in range(0, self.num_rows, _INIT_ROWS):
                e = min(s + _INIT_ROWS, self.num_rows)
                part = buf[: e - s].normal_(0.0, std)
                a, b = max(s, lo), min(e, hi)
                if a < b:
                    self.weight[a - lo : b - lo] = part[a - s : b - s]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            if not self.sparse and wants_row_gradients(self.weight):
                if torch.compiler.is_compiling():
                    return read_rows_eagerly(ids, self.weight)  # inductor cannot lower a sparse gradient
                return F.embedding(ids, self.weight, sparse=reading_rows(self.weight))
            return F.embedding(ids, self.weight, sparse=self.sparse)
        return self._routed(ids)

    def _routed(self, ids: torch.Tensor) -> torch.Tensor:  # eager under run.compile: _routed_runs_eagerly
        flat = ids.reshape(-1)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            out = RouteRows.apply(self.weight, flat, self)
        else:
            uniq, inverse = torch.unique(flat, sorted=True, return_inverse=True)
            _, send_counts, recv_counts, recv_ids = _round(self.table_id, True, uniq, self.rows, self.weight.device)
            out = _answer(self.weight.detach(), self.rows, recv_ids, send_counts, recv_counts)[inverse]
            self.last_unique, self.last_send_counts = uniq.numel(), send_counts
        return out.view(*ids.shape, self.embedding_dim)

    def self_managed_parameters(self) -> list[nn.Parameter]:
        """Left out of DDP on N ranks: each rank's rows are its own; gradients arrive by all-to-all."""
        return [self.weight] if self.sharded else []

    def extra_repr(self) -> str:
        r = self.rows
        return f"{self.num_rows}, {self.embedding_dim}, rows [{r.start}, {r.stop}) of rank {r.rank}/{r.world}" + (", sparse" if self.sparse else "")


# ---- state_dict hooks (public nn.Module hooks) ---------------------------------------------------


def _drop_rows_from_state(module, state_dict, prefix, local_metadata):
    state_dict.pop(prefix + "weight", None)  # N ranks: written by engram_core.tables.state


def _take_own_rows(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    key = prefix + "weight"
    module.state_key = key  # for the post hook, which sees the whole load's missing keys
    full = state_dict.get(key)
    if full is not None and full.shape[0] == module.num_rows and module.rows.local_rows != module.num_rows:
        state_dict[key] = full[module.rows.start : module.rows.stop]  # a one-process checkpoint: keep our rows


def _rows_come_from_sharded_state(module, incompatible):
    key = getattr(module, "state_key", None)
    if key in incompatible.missing_keys:  # rows absent from a state_dict written by N ranks: sharded_state loads them
        incompatible.missing_keys.remove(key)


def serve_peers() -> int:
    """Answer the other ranks' lookups until every rank has called this (collective).

    A rank that finished its share of an evaluation calls it; the others, still reading
    tables, find it answering their rounds. Returns the rounds served. No-op on one process
    or where no table is sharded."""
    tables = {t.table_id: t for t in (ref() for ref in _tables) if t is not None}
    if not tables or _group is None:
        return 0
    any_table = next(iter(tables.values()))
    rows0 = any_table.rows
    device = any_table.weight.device
    served = 0
    nothing = torch.empty(0, dtype=torch.long, device=device)
    while True:
        group = lookup_group()
        header = torch.zeros(rows0.world, 3, dtype=torch.long, device=device)
        header[:, 1] = -1
        got = torch.empty_like(header)
        torch_dist.all_to_all_single(got, header, group=group)
        got = got.cpu()
        flags, which, recv = got[:, 0].tolist(), got[:, 1].tolist(), got[:, 2].tolist()
        if not any(flags):
            return served
        asked = {t for f, t in zip(flags, which) if f}
        if len(asked) != 1 or next(iter(asked)) not in tables:
            raise ShardedLookupError(f"peers read sharded tables {sorted(asked)} in one round; this rank has {sorted(tables)}")
        table = tables[next(iter(asked))]
        send_counts = [0] * rows0.world
        ids = _exchange(nothing, send_counts, recv, group)
        _answer(table.weight.detach(), table.rows, ids, send_counts, recv)
        served += 1


def sharded_tables(module: nn.Module) -> list[tuple[str, ShardedEmbedding]]:
    """(qualified name, table) of every ShardedEmbedding in `module` that is split over ranks."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, ShardedEmbedding) and m.sharded]


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, model: nn.Module | None = None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole model when some parameters are row
    shards: their squared norms are summed over ranks (the replicated ones are equal on every
    rank after DDP, so they count once), and every rank scales by the same factor."""
    shards = {id(m.weight) for _, m in sharded_tables(model)} if model is not None else set()
    grads = [p.grad for p in params if p.grad is not None]
    if not shards:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    own = [p.grad for p in params if p.grad is not None and id(p) in shards]
    rep = [p.grad for p in params if p.grad is not None and id(p) not in shards]
    device = grads[0].device if grads else torch.device("cpu")
    rep_sq = torch.nn.utils.get_total_norm(rep).to(device, torch.float32) ** 2 if rep else torch.zeros((), device=device)
    own_sq = torch.nn.utils.get_total_norm(own).to(device, torch.float32) ** 2 if own else torch.zeros((), device=device)
    torch_dist.all_reduce(own_sq, group=lookup_group())
    total = (rep_sq + own_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total
