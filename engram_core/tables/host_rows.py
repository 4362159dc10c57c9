"""The ``host`` row-table placement: rows in (pinned) host memory, read through a device
buffer that is filled ahead of the forward.

Addresses depend on token ids only, so the rows a step will read are known as soon as
its batch is drawn. For each step:

    prefetch(rows)   unique rows of the next batch → gathered from host memory into a
                     device buffer (CUDA: in a worker thread, copied on a side stream)
    forward(rows)    reads the buffer; a row that was not prefetched is fetched then and
                     there (synchronously) and counted as a miss
    backward         the buffer is a leaf: its gradient is (rows read, W), never (R, W)
    optimiser step   a row-wise optimiser (engram_core.optim) takes the working set (the
                     read rows, their optimiser state, their gradients) on the device,
                     updates it, and the table writes rows and state back to host memory
                     (CUDA: asynchronously) and patches the buffers already prefetched
                     for later steps, so no buffer ever holds a stale row.

On CPU the same code runs without threads or streams, so CI tests its logic. The rows'
optimiser state lives beside them in host memory; both are in the state dict (the rows
under ``<prefix>weight``, as the device placement has them, the state under
``<prefix>optimizer.<name>``).

`weight` is a parameter with no elements: the handle through which the recipe's
param_groups, `requires_grad` and the optimiser reach the table (`attach_row_holder`).
Only a row-wise optimiser can train it; any other leaves it unchanged, which the first
training forward reports as an error.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .rowwise import attach_row_holder


class _Segment:
    """Rows of one step on the device: sorted unique global `rows` (U,), their `values`
    (U, W) (a leaf while training) and their optimiser `state`."""

    def __init__(self, rows: torch.Tensor, values: torch.Tensor, state: dict[str, torch.Tensor], ready=None, keep=()):
        self.rows = rows
        self.values = values
        self.state = state
        self.ready = ready  # CUDA event: the copies are done
        self.keep = keep  # pinned host buffers that must outlive the copies


class _Step(list):
    """The segments one optimiser step reads: the prefetched one, then any misses."""


class HostRowTable(nn.Module):
    """Rows in host memory (pinned where CUDA is available), prefetched to the device."""

    placement = "host"
    prefetches = True  # its memory asks the engine for each batch a step ahead

    INIT_CHUNK = 1 << 26  # elements initialised at a time in tables larger than this

    def __init__(self, num_rows: int, dim: int, sparse: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_rows, dim
        self.pinned = torch.cuda.is_available()
        # not a Parameter: .to() leaves it on the host. In the default dtype, as nn.Embedding
        # makes its weight (build under torch.set_default_dtype(torch.bfloat16) for bf16 rows
        # without a float32 copy first)
        self.rows = torch.empty(num_rows, dim, dtype=dtype or torch.get_default_dtype(), device="cpu", pin_memory=self.pinned)
        self._init_rows()
        self.optimizer_state: dict[str, torch.Tensor] = {}
        self.weight = nn.Parameter(torch.zeros(0, dtype=self.rows.dtype))
        attach_row_holder(self.weight, self)
        self.pending: deque[_Step] = deque()  # prefetched steps, oldest (the one being trained) first
        self._futures: deque[Future] = deque()
        self._worker: ThreadPoolExecutor | None = None
        self._side = None
        self._lock = threading.Lock()
        self._taken = None
        self.optimizer = None  # the row-wise optimiser that claimed this table (engram_core.optim)
        self.reset_counters()
        self.register_state_dict_post_hook(_save_rows)
        self.register_load_state_dict_pre_hook(_load_rows)

    def init_normal_(self, std: float = 1.0) -> None:
        """The rows drawn again from N(0, std²), as `nn.init.normal_(full_weight, std=std)`
        (the same numbers up to INIT_CHUNK elements) but in parallel chunks beyond."""
        self.drain()
        self._init_rows(std)

    @torch.no_grad()
    def _init_rows(self, std: float = 1.0) -> None:
        """N(0, 1) as nn.Embedding initialises: one call (the device placement's random
        stream, so both start from the same rows) up to INIT_CHUNK elements. Beyond, chunks
        of rows filled by as many threads as torch uses (a CPU's normal_ is serial: a
        4 × 10⁸-row table took minutes on one thread), each chunk from its own generator,
        whose seeds are one draw from the default one (so `torch.manual_seed` still fixes
        the rows, whatever the number of threads); no second table-sized buffer."""
        per = max(1, self.INIT_CHUNK // self.embedding_dim)
        if self.num_embeddings <= per:
            nn.init.normal_(self.rows, std=std)
            return
        starts = range(0, self.num_embeddings, per)
        seeds = torch.randint(0, 2**62, (len(starts),), dtype=torch.int64).tolist()

        def fill(lo: int, seed: int) -> None:
            self.rows[lo : lo + per].normal_(std=std, generator=torch.Generator().manual_seed(seed))

        with ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), len(starts)))) as pool:
            list(pool.map(fill, starts, seeds))

    # ---- the row-table protocol ----------------------------------------------------------

    @property
    def full_weight(self) -> torch.Tensor:
        self.drain()
        return self.rows

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.drain()
        self.rows = self.rows.to(dtype).pin_memory() if self.pinned else self.rows.to(dtype)
        self.pending.clear()

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @contextlib.contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - start

    def prefetch(self, rows) -> None:
        """Start moving the rows the next step reads to the device. `rows`: an int64
        tensor of any shape (the addresses), or a function returning one (called in the
        worker thread on CUDA, so hashing the next batch leaves this thread free)."""
        with self._timed("prefetch"):
            self._prefetch(rows)

    def _prefetch(self, rows) -> None:
        # a front step that no gradient reached (a frozen table, a stage without memory) is
        # never consumed by an update: keep at most the step before the new one
        while len(self.pending) >= 2 and not self._has_grad(self.pending[0]):
            self.pending.popleft()
        step = _Step()
        self.pending.append(step)
        grad = self.weight.requires_grad

        def job():
            r = rows() if callable(rows) else rows
            unique = torch.unique(r.reshape(-1).to("cpu", torch.int64))
            return self._gather(unique, grad)

        self._submit(job, into=step)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and self.weight.requires_grad
        flat = rows.reshape(-1)
        if training:
            self._train_reads += flat.numel()
        else:
            self._eval_reads += flat.numel()
        step = self._step_for(flat, training)
        pos, found, values, segs = self._locate(step, flat)
        if found is None or not bool(found.all()):  # the one host sync of a lookup
            missing = flat if found is None else flat[~found]
            n_missing = int(missing.numel())
            if training:
                self._train_misses += n_missing
            else:
                self._eval_misses += n_missing
            self._sync_fetches += 1
            with self._timed("miss"):
                seg = self._call(lambda: self._gather(torch.unique(missing.to("cpu", torch.int64)), training))
            if training:
                step.append(seg)
            else:
                step = _Step([*step, seg])
            self._wait(step)  # the fetched rows' copies are done before they are read
            pos, found, values, segs = self._locate(step, flat)
        return F.embedding(pos, values).view(*rows.shape, self.embedding_dim)

    def stats(self) -> dict[str, float]:
        out = {}
        steps = max(self._updates, 1)
        for name, seconds in self._seconds.items():  # where this thread's time went, per optimiser step
            out[f"host_{name}_ms_per_step"] = 1000 * seconds / steps
        if self._train_reads:
            out["prefetch_hit_rate"] = 1.0 - self._train_misses / self._train_reads
        if self._updates:
            out["host_rows_per_step"] = self._rows_moved / self._updates
            out["host_bytes_per_step"] = self._bytes_moved / self._updates
        if self._eval_reads:
            out["eval_fetch_rate"] = self._eval_misses / self._eval_reads
        out["sync_fetches"] = float(self._sync_fetches)
        self.reset_counters()
        return out

    def reset_counters(self) -> None:
        self._train_reads = self._train_misses = self._eval_reads = self._eval_misses = 0
        self._sync_fetches = self._updates = self._rows_moved = self._bytes_moved = 0
        self._seconds = {"prefetch": 0.0, "wait": 0.0, "miss": 0.0, "update": 0.0}

    # ---- the optimiser's side (engram_core.tables.rowwise.RowHolder) ---------------------

    def gradient_leaves(self) -> list[torch.Tensor]:
        """The device buffers whose `.grad` holds this step's row gradients (what gradient
        clipping must see beside the parameters' own gradients)."""
        if not self.pending:
            return []
        return [seg.values for seg in self.pending[0] if seg.values.grad is not None]

    def claim(self, optimizer) -> None:
        self.optimizer = optimizer

    def take_update(self, specs):
        with self._timed("update"):
            return self._take_update(specs)

    def _take_update(self, specs):
        if not self.pending or not self._has_grad(self.pending[0]):
            return None
        step = self.pending.popleft()
        self._wait(step)
        with self._lock:
            for name, shape in specs:  # first update: the state is made, zeros, beside the rows
                if name not in self.optimizer_state:
                    self.optimizer_state[name] = torch.zeros((self.num_embeddings, *shape), device="cpu", pin_memory=self.pinned)
        parts = []
        for seg in step:
            if seg.values.grad is None:
                continue
            # every row of a segment was fetched for this step's reads; one whose gradient is
            # all zero (reads that cancelled) is left as it is by `keep`, decided on the
            # device: selecting the touched rows instead would read the device on the host
            # (a synchronisation in the middle of the backward on CUDA)
            grad = seg.values.grad
            state = {name: _state_rows(seg, name, shape) for name, shape in specs}
            parts.append((seg.rows, seg.values.detach(), state, grad, grad.ne(0).any(dim=1)))
        rows = torch.cat([p[0] for p in parts])
        values = torch.cat([p[1] for p in parts])
        state = {name: torch.cat([p[2][name] for p in parts]) for name, _ in specs}
        grad = torch.cat([p[3] for p in parts])
        keep = torch.cat([p[4] for p in parts])
        self._taken = (rows, values, state)
        return values, state, torch.arange(rows.shape[0], device=rows.device), grad, keep

    def rows_updated(self) -> None:
        with self._timed("update"):
            self._rows_updated()

    def _rows_updated(self) -> None:
        rows, values, state = self._taken
        self._taken = None
        for step in self.pending:  # rows already prefetched for later steps get the new values
            self._wait(step)
            for seg in step:
                _patch(seg, rows, values, state)
        self._updates += 1
        self._rows_moved += rows.shape[0]
        self._bytes_moved += values.numel() * values.element_size() + sum(s.numel() * s.element_size() for s in state.values())  # written back
        self._write_back(rows, values, state)

    # ---- host <-> device ------------------------------------------------------------------

    def _gather(self, unique: torch.Tensor, grad: bool) -> _Segment:
        """Copy rows `unique` (sorted, on the host) and their state to the device."""
        dev = self.device
        pin = dev.type == "cuda"  # gathered straight into pinned buffers, so the copies are asynchronous
        n = unique.shape[0]
        if pin:
            unique = unique.pin_memory()
        with self._lock:  # no write-back lands while rows are read
            values = torch.index_select(self.rows, 0, unique, out=torch.empty((n, self.embedding_dim), dtype=self.rows.dtype, pin_memory=pin))
            state = {
                k: torch.index_select(v, 0, unique, out=torch.empty((n, *v.shape[1:]), dtype=v.dtype, pin_memory=pin))
                for k, v in self.optimizer_state.items()
            }
        self._rows_moved += unique.numel()
        self._bytes_moved += values.numel() * values.element_size() + sum(s.numel() * s.element_size() for s in state.values())
        if dev.type != "cuda":
            seg = _Segment(unique, values, state)
        else:
            host = [unique, values, *state.values()]
            stream = self._side_stream()
            with torch.cuda.stream(stream):
                moved = [t.to(dev, non_blocking=True) for t in host]
                ready = torch.cuda.Event()
                ready.record(stream)
            seg = _Segment(moved[0], moved[1], dict(zip(state, moved[2:])), ready=ready, keep=host)
        if grad:
            seg.values.requires_grad_(True)
        return seg

    def _write_back(self, rows: torch.Tensor, values: torch.Tensor, state: dict) -> None:
        """Store updated rows and state in host memory (CUDA: copied on the side stream,
        written by the worker thread; every later host read is queued behind it)."""
        if self.device.type != "cuda":
            with self._lock:
                self.rows.index_copy_(0, rows, values.to(self.rows.dtype))
                for k, v in state.items():
                    self.optimizer_state[k].index_copy_(0, rows, v)
            return
        stream = self._side_stream()
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            tensors = [rows, values.to(self.rows.dtype), *state.values()]
            host = []
            for t in tensors:
                t.record_stream(stream)
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                buf.copy_(t, non_blocking=True)
                host.append(buf)
            done = torch.cuda.Event()
            done.record(stream)

        def job():
            done.synchronize()
            with self._lock:
                self.rows.index_copy_(0, host[0], host[1])
                for k, buf in zip(state, host[2:]):
                    self.optimizer_state[k].index_copy_(0, host[0], buf)

        self._submit(job)

    def _side_stream(self):
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _submit(self, job, into: _Step | None = None) -> None:
        """Run `job` now (CPU) or in the worker thread, in order (CUDA); its segment
        goes into `into` when it is done."""
        if self.device.type != "cuda":
            seg = job()
            if into is not None:
                into.append(seg)
            return
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-host-rows")
        fut = self._worker.submit(job)
        if into is not None:
            into.future = fut
        self._futures.append(fut)
        while self._futures and self._futures[0].done():
            self._futures.popleft().result()  # raise a failed job's error here

    def _call(self, job):
        """`job()` behind every queued host read and write; its result."""
        if self.device.type != "cuda" or self._worker is None:
            self.drain()
            return job()
        return self._worker.submit(job).result()

    def drain(self) -> None:
        """Wait for every queued copy and write-back (checkpoints, `full_weight`)."""
        while self._futures:
            self._futures.popleft().result()

    def _wait(self, step: _Step) -> None:
        with self._timed("wait"):
            self._wait_for(step)

    def _wait_for(self, step: _Step) -> None:
        fut = getattr(step, "future", None)
        if fut is not None:
            step.append(fut.result())
            step.future = None
        if self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            for seg in step:
                if seg.ready is not None:
                    current.wait_event(seg.ready)
                    for t in (seg.rows, seg.values, *seg.state.values()):
                        t.record_stream(current)
                    seg.ready = None

    # ---- lookups ------------------------------------------------------------------------

    def _step_for(self, flat: torch.Tensor, training: bool) -> _Step:
        if not training:
            if self.pending:
                self._wait(self.pending[0])
            return _Step(self.pending[0]) if self.pending else _Step()
        if self.optimizer is None:
            raise RuntimeError(
                "a table with placement 'host' is trained by a row-wise optimiser (rowwise_adagrad or rowwise_adam), and none holds it: "
                "in a recipe add param_groups = [{ params = [\"memory.*.table.weight\"], optimizer = \"rowwise_adagrad\" }]; "
                "from Python use engram_core.optim.RowwiseAdagrad / RowwiseAdam (or engram_llm_hash.engram_optimizer); "
                "or freeze the table (requires_grad_(False))"
            )
        if not self.pending:
            self.pending.append(_Step())
        self._wait(self.pending[0])
        if len(self.pending) > 1 and not self._has_grad(self.pending[0]):
            # the front step got no gradient: if the next prefetched step holds every row,
            # this is that step's forward (a frozen table is never consumed by an update)
            _, found, _, _ = self._locate(self.pending[0], flat)
            if found is None or not bool(found.all()):
                self._wait(self.pending[1])
                _, nxt, _, _ = self._locate(self.pending[1], flat)
                if nxt is not None and bool(nxt.all()):
                    self.pending.popleft()
        return self.pending[0]

    @staticmethod
    def _has_grad(step: _Step) -> bool:
        return any(seg.values.grad is not None for seg in step)

    def _locate(self, step: _Step, flat: torch.Tensor):
        """(index into values, found mask, values, segments) of `flat` rows in `step`."""
        segs = [s for s in step if s.rows.numel()]
        if not segs:
            return torch.zeros_like(flat), None, None, segs
        flat = flat.to(segs[0].rows.device)
        if len(segs) == 1:
            keys, values, order = segs[0].rows, segs[0].values, None
        else:
            keys_all = torch.cat([s.rows for s in segs])
            values = torch.cat([s.values for s in segs])
            order = torch.argsort(keys_all)
            keys = keys_all[order]
        at = torch.searchsorted(keys, flat).clamp_(max=keys.shape[0] - 1)
        found = keys[at] == flat
        pos = at if order is None else order[at]
        return pos, found, values, segs


def _state_rows(seg: _Segment, name: str, shape) -> torch.Tensor:
    """A segment's rows of state `name`; zeros where it was gathered before the state existed."""
    if name not in seg.state:
        seg.state[name] = torch.zeros((seg.rows.shape[0], *shape), device=seg.rows.device)
    return seg.state[name]


@torch.no_grad()
def _patch(seg: _Segment, rows: torch.Tensor, values: torch.Tensor, state: dict) -> None:
    """Give `seg` the new values (and state) of the `rows` it also holds."""
    if not seg.rows.numel() or not rows.numel():
        return
    at = torch.searchsorted(seg.rows, rows).clamp_(max=seg.rows.shape[0] - 1)
    hit = seg.rows[at] == rows
    if not bool(hit.any()):
        return
    where, src = at[hit], hit.nonzero().squeeze(1)
    seg.values.index_copy_(0, where, values.index_select(0, src).to(seg.values.dtype))
    for name, v in state.items():
        _state_rows(seg, name, v.shape[1:]).index_copy_(0, where, v.index_select(0, src))


def _save_rows(module: HostRowTable, state_dict, prefix, local_metadata) -> None:
    module.drain()
    state_dict[prefix + "weight"] = module.rows
    for name, t in module.optimizer_state.items():
        state_dict[f"{prefix}optimizer.{name}"] = t


def _load_rows(module: HostRowTable, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    module.drain()
    key = prefix + "weight"
    if key in state_dict:
        rows = state_dict[key]
        if tuple(rows.shape) != tuple(module.rows.shape):
            error_msgs.append(f"size mismatch for {key}: copying rows of shape {tuple(rows.shape)}, the table has {tuple(module.rows.shape)}")
        else:
            module.rows.copy_(rows)
        state_dict[key] = torch.zeros(0, dtype=module.weight.dtype)  # what the placeholder parameter loads
    saved = {k[len(prefix) + len("optimizer.") :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + "optimizer.")}
    module.optimizer_state = {k: v.to("cpu").clone().pin_memory() if module.pinned else v.to("cpu").clone() for k, v in saved.items()}
    module.pending.clear()


def host_row_table(num_rows: int, dim: int, sparse: bool = False) -> HostRowTable:
    if not isinstance(num_rows, int) or num_rows < 1:
        raise ConfigError("placement", f"a host table needs at least one row, got {num_rows!r}")
    return HostRowTable(num_rows, dim, sparse=sparse)
