"""One run over N ranks, the ordinary PyTorch way: torchrun, torch.distributed, DDP.

    torchrun --nproc_per_node=N -m engram_core.run RECIPE.toml [key=value ...]
    engram-run --nproc N RECIPE.toml            (runs torchrun's launcher for you)

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `setup` joins the process group (gloo for CPU
tensors, NCCL for CUDA tensors when CUDA is present) and `current()` hands the engine a `Dist`.
Without torchrun `current()` is the one-process `Dist` (rank 0 of 1) and every helper here is a
no-op, so the engine has one code path.

How a run stays equal to the one-process run:
- data: every rank draws the *global* batch with the same seeded generator and keeps its own
  contiguous slice (`shard`), so the N slices are exactly the one-process batch and the
  generator's state, hence resume, is the same on every rank;
- gradients: DDP averages the ranks' gradients of their equal-sized slices, which is the
  gradient of the global mean loss;
- eval: each rank takes a contiguous block of a metric's batches and the metric's *states*
  (sums, counts, lists) are reduced (`Metric.dist_reduce`) before `compute`, never averages of averages;
- fit actions: run on rank 0 and the model's state is broadcast, or, where the component lists
  the action in `sharded_actions`, run on every rank, which reduces through `ctx.dist`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable
from typing import Any

import attrs
import torch
import torch.distributed as torch_dist
from torch import nn

from ..errors import RecipeError


@attrs.define
class Dist:
    """This process's place in the run, and the collectives the engine and components use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # the process group's backend string; None without one

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run directory, logs and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    # ---- collectives (no-ops on one process) ---------------------------------------------

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks, in place; returns it."""
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (picklable objects; move tensors to the CPU first)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def broadcast_state(self, module: nn.Module, src: int = 0) -> None:
        """Load rank `src`'s `state_dict` into `module` on every rank (what a checkpoint carries,
        so whatever survives a resume survives the broadcast, shapes that changed included)."""
        if not self.enabled:
            return
        state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()} if self.rank == src else None
        state = self.broadcast_object(state, src)
        if self.rank != src:
            module.load_state_dict(state)

    # ---- data ------------------------------------------------------------------------------

    def block(self, items: list) -> list:
        """This rank's contiguous block of `items` (eval batches): rank 0 the first ~n/N, and so on,
        so states concatenated in rank order ("cat") keep the one-process order."""
        n = len(items)
        return items[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size]

    def shard(self, batch: Any, batch_size: int) -> Any:
        """This rank's contiguous slice of a global batch of `batch_size` examples."""
        if not self.enabled:
            return batch
        per = batch_size // self.world_size
        return slice_batch(batch, batch_size, self.rank * per, (self.rank + 1) * per)


def slice_batch(batch: Any, size: int, start: int, stop: int) -> Any:
    """Examples [start, stop) of a batch of `size`: every tensor (or list) whose leading size is
    `size` is sliced, through nested dicts and lists; anything else (a scalar, a table shared by
    the batch) is kept whole."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, dict):
        return {k: slice_batch(v, size, start, stop) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        if len(batch) == size and not any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in batch):
            return type(batch)(batch[start:stop])  # per-example plain values (strings, ids)
        return type(batch)(slice_batch(v, size, start, stop) for v in batch)
    return batch


def micro_batches(batch: Any, size: int, k: int) -> list[Any]:
    """`batch` (of `size` examples) cut into `k` equal micro-batches for gradient accumulation."""
    if k == 1:
        return [batch]
    per = size // k
    return [slice_batch(batch, size, i * per, (i + 1) * per) for i in range(k)]


def check_batch_split(batch_size: int, world_size: int, grad_accum: int, where: str, file: str | None) -> None:
    """The global batch must split evenly over ranks and micro-steps (else the mean changes)."""
    parts = world_size * grad_accum
    if batch_size % parts:
        lo, hi = (batch_size // parts) * parts, (batch_size // parts + 1) * parts
        hint = f"use {lo or hi} or {hi}" if lo else f"use {hi}"
        raise RecipeError([(f"{where}.batch_size", f"{batch_size} does not split into {world_size} rank(s) x {grad_accum} micro-batch(es); {hint}")], file)


# ---- the process group -----------------------------------------------------------------------

_current = Dist()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup() -> Dist:
    """Join the process group torchrun describes in the environment (once); returns `current()`.

    With CUDA present the group has both backends ("cpu:gloo,cuda:nccl"): NCCL for the CUDA
    tensors of training, gloo for CPU tensors (a recipe with run.device = "cpu" on a GPU host,
    and the pickled objects of `all_gather_object`).
    """
    global _current
    if not launched_by_torchrun() or _current.enabled:
        return _current
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world <= 1:
        _current = Dist(rank, world, local, None)
        return _current
    if torch.cuda.is_available():
        torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    minutes = float(os.environ.get("ENGRAM_DIST_TIMEOUT_MIN", "30"))
    torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=minutes))
    _current = Dist(rank, world, local, backend)
    return _current


def teardown(finished: bool = True) -> None:
    """Leave the engine's process group (see `leave_process_group`); a single process only
    forgets the sharded tables' lookup group."""
    if _current.enabled:
        leave_process_group(finished)
        return
    _left_process_group()


_ON_LEAVE: dict = {}  # id -> what to call once the run left its process group (or never had one)


def on_leave(fn) -> None:
    """Call `fn()` when the run leaves its process group (`teardown`): for anything built on the
    group that must not outlive it (row-sharded tables' lookup group). Registering twice is once."""
    _ON_LEAVE[id(fn)] = fn


def _left_process_group() -> None:
    for fn in list(_ON_LEAVE.values()):
        fn()


def leave_process_group(finished: bool = True) -> None:
    """Leave the default process group and every group made from it, however it was set up
    (the engine, or a script's own init_process_group). After a normal finish each rank first
    drops what still holds the groups (DDP wrappers, sharded tables: `gc.collect()`) and waits
    for the others: a rank that exits while a peer's gloo threads still talk to it makes that
    peer abort ("terminate called without an active exception"). After a failure there is no
    barrier, since the peer may be gone."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        if finished:
            import gc

            gc.collect()
            torch_dist.barrier()
        torch_dist.destroy_process_group()
    _left_process_group()
    _current = Dist()


def lost_a_rank(exc: BaseException) -> bool:
    """Whether a collective failed because a peer process went away (gloo reports it as a
    RuntimeError naming the closed connection; NCCL as a DistError)."""
    if isinstance(exc, torch_dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("Connection closed by peer" in text or "remote worker crashing" in text or "Connection reset by peer" in text)


def current() -> Dist:
    return _current


def rank_device(name: str, dist: Dist) -> str:
    """The device name a rank uses: 'auto' and 'cuda' become this rank's GPU (cuda:LOCAL_RANK)."""
    if not dist.enabled:
        return name
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{dist.local_rank % torch.cuda.device_count()}"
    if name.startswith("cuda:"):
        raise RecipeError([("run.device", f"'{name}' names one GPU, but {dist.world_size} ranks run; use 'auto' or 'cuda' (each rank takes the GPU of its LOCAL_RANK)")])
    return name


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


# ---- the model -------------------------------------------------------------------------------


class TrainStep(nn.Module):
    """The model and a stage's objective as one module, so DDP sees the forward it must wrap."""

    def __init__(self, model: nn.Module, objective: nn.Module):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch):
        return self.objective(self.model, batch)


def self_managed_parameters(components: Iterable[Any]) -> set[int]:
    """ids of parameters components manage themselves (`self_managed_parameters()`), left out of DDP."""
    ids: set[int] = set()
    for comp in components:
        # the component's own list, and those of its submodules (a row-sharded table inside a memory)
        parts = list(comp.modules()) if isinstance(comp, nn.Module) else [comp]
        for part in parts:
            fn = getattr(part, "self_managed_parameters", None)
            if fn is not None:
                ids |= {id(p) for p in fn()}
    return ids


def wrap_train_step(model: nn.Module, objective: nn.Module, components: Iterable[Any], dist: Dist, device: torch.device):
    """The callable a train step runs: `objective(model, batch)` on one process, DDP on N.

    `find_unused_parameters` is on only when a component sets `ddp_find_unused_parameters = True`
    (it costs a graph traversal per step). Parameters a component lists in
    `self_managed_parameters()` are taken out of their modules while DDP is built, so DDP
    neither broadcasts rank 0's values over them (a row shard differs on every rank, and may
    differ in shape), nor registers or all-reduces them; they are put back, in their order, and
    the component syncs them itself.
    """
    components = list(components)
    if not dist.enabled:
        return lambda batch: objective(model, batch), contextlib.nullcontext
    step = TrainStep(model, objective)
    find_unused = any(getattr(c, "ddp_find_unused_parameters", False) for c in components)
    ignored = self_managed_parameters(components)
    if not any(p.requires_grad for p in step.parameters() if id(p) not in ignored):
        return lambda batch: objective(model, batch), contextlib.nullcontext  # nothing for DDP to sync
    owners = [(m, list(m.named_parameters(recurse=False))) for m in step.modules()]
    owners = [(m, params) for m, params in owners if any(id(p) in ignored for _, p in params)]
    for m, params in owners:
        for name, p in params:
            if id(p) in ignored:
                delattr(m, name)
    try:
        ddp = nn.parallel.DistributedDataParallel(
            step,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )
    finally:
        for m, params in owners:  # back in their original order (optimizer and state_dict order)
            for name, p in params:
                if hasattr(m, name):
                    delattr(m, name)
                m.register_parameter(name, p)
    return ddp, ddp.no_sync
