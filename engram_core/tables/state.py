"""Checkpoints of row-sharded tables: each rank writes its rows, any number of ranks reads them.

The engine's `last.pt` is written by rank 0 and holds what every rank shares. The rows of a
`ShardedEmbedding` split over N ranks (and the per-row optimiser state of those rows: Adam's
moments) are not in it: every rank writes its own with `torch.distributed.checkpoint` (DCP)
into `checkpoints/tables-<tag>/`, as a DTensor sharded on dim 0 (`Shard(0)`, the same
contiguous chunk layout the table uses), and `last.pt` names that folder. Loading reads
whatever rows this process owns now: a table split over M ranks, or the whole table on one
process (DCP without a process group), so a checkpoint of N ranks resumes on 1 or M.

Scalar optimiser state (Adam's `step`) is equal on every rank and stays in `last.pt`.
A checkpoint written by one process holds the whole table in `last.pt` as usual; N ranks
take their rows from it (`ShardedEmbedding`'s load hook, and `take_rows` below).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from .sharded_rows import ShardedEmbedding, sharded_tables

FOLDER_PREFIX = "tables-"


def _all_tables(model: nn.Module) -> list[tuple[str, ShardedEmbedding]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ShardedEmbedding)]


def _row_keys(opt: torch.optim.Optimizer, p: torch.Tensor) -> list[str]:
    """Optimiser state of `p` with one entry per row (moments), not scalars (step)."""
    st = opt.state.get(p, {})
    return [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == p.shape[0]]


def _as_dtensor(local: torch.Tensor, table: ShardedEmbedding, mesh):
    from torch.distributed.tensor import DTensor, Shard

    shape = (table.num_rows,) + tuple(local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local.detach().contiguous(), mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


_mesh = None


def _device_mesh(device: torch.device):
    global _mesh
    if _mesh is None or _mesh.device_type != device.type:
        from torch.distributed.device_mesh import init_device_mesh

        _mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    return _mesh


def save(run_dir: Path, tag: str, model: nn.Module, opts: list[torch.optim.Optimizer]) -> dict | None:
    """Every rank: write this rank's rows (and their optimiser rows) under checkpoints/tables-<tag>/.
    Returns what `last.pt` keeps to find them again, or None where no table is sharded."""
    tables = sharded_tables(model)
    if not tables:
        return None
    import torch.distributed.checkpoint as dcp

    device = tables[0][1].weight.device
    mesh = _device_mesh(device)
    state, optim_keys = {}, {}
    for name, table in tables:
        state[f"model.{name}.weight"] = _as_dtensor(table.weight, table, mesh)
        for i, opt in enumerate(opts):
            keys = _row_keys(opt, table.weight)
            if keys:
                optim_keys[f"{i}.{name}"] = keys
            for k in keys:
                state[f"optim.{i}.{name}.{k}"] = _as_dtensor(opt.state[table.weight][k], table, mesh)
    folder = f"{FOLDER_PREFIX}{tag}"
    dcp.save(state, checkpoint_id=str(Path(run_dir) / "checkpoints" / folder))
    return {"folder": folder, "tables": {n: [t.num_rows, t.embedding_dim] for n, t in tables}, "optim": optim_keys, "world_size": torch_dist.get_world_size()}


def strip_rows(opt_states: list[dict], opts: list[torch.optim.Optimizer], model: nn.Module) -> list[dict]:
    """The optimisers' state dicts for `last.pt` without the per-row state of sharded tables
    (rank 0's rows only: the whole is in the tables folder)."""
    tables = sharded_tables(model)
    if not tables:
        return opt_states
    out = []
    for opt, sd in zip(opts, opt_states):
        index = {id(p): i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
        state = dict(sd["state"])
        for _, table in tables:
            i = index.get(id(table.weight))
            if i is not None and i in state:
                state[i] = {k: v for k, v in state[i].items() if k not in _row_keys(opt, table.weight)}
        out.append({**sd, "state": state})
    return out


def _load(run_dir: Path, ref: dict, targets: dict) -> None:
    import torch.distributed.checkpoint as dcp

    if targets:
        dcp.load(targets, checkpoint_id=str(Path(run_dir) / "checkpoints" / ref["folder"]))


def _target(table: ShardedEmbedding, like: torch.Tensor | None = None):
    local = torch.empty_like(table.weight) if like is None else like
    return _as_dtensor(local, table, _device_mesh(local.device)) if table.sharded else local


def load_model_state(run_dir: Path, state: dict, model: nn.Module) -> None:
    """Every rank: `model.load_state_dict(state["model"])`, then the rows of sharded tables
    from the checkpoint's tables folder where it has one (then, and only then, the table
    rows may be absent from state["model"])."""
    ref = state.get("sharded_tables")
    if not ref:
        model.load_state_dict(state["model"])
        return
    result = model.load_state_dict(state["model"], strict=False)
    expected = {f"{n}.weight" for n in ref["tables"]}
    wrong = [k for k in result.missing_keys if k not in expected] + list(result.unexpected_keys)
    if wrong:
        raise RuntimeError(f"checkpoint does not match the model: {', '.join(wrong[:5])}")
    load_model(run_dir, ref, model)


def load_model(run_dir: Path, ref: dict | None, model: nn.Module) -> None:
    """Every rank: this process's rows of every table the checkpoint holds in its folder."""
    if not ref:
        return
    check_tables(ref, model)
    targets = {}
    for name, table in _all_tables(model):
        if name in ref["tables"]:
            targets[f"model.{name}.weight"] = _target(table)
    _load(run_dir, ref, targets)
    with torch.no_grad():
        for name, table in _all_tables(model):
            t = targets.get(f"model.{name}.weight")
            if t is not None:
                table.weight.copy_(t.to_local() if table.sharded else t)


def load_optimizers(run_dir: Path, ref: dict | None, opts: list[torch.optim.Optimizer], model: nn.Module) -> None:
    """Every rank, after `opt.load_state_dict`: the per-row state of the tables' rows this rank owns,
    from the tables folder (N-rank checkpoint) or sliced from the whole (one-process checkpoint)."""
    tables = _all_tables(model)
    targets, fill = {}, []
    for i, opt in enumerate(opts):
        for name, table in tables:
            p = table.weight
            if p not in opt.state:
                continue
            st = opt.state[p]
            for k, v in list(st.items()):  # a one-process checkpoint: the whole table's rows
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == table.num_rows != p.shape[0]:
                    st[k] = v[table.rows.start : table.rows.stop].clone()
            for k in (ref or {}).get("optim", {}).get(f"{i}.{name}", []):
                local = torch.zeros_like(p, memory_format=torch.contiguous_format)
                targets[f"optim.{i}.{name}.{k}"] = _target(table, local)
                fill.append((st, k, table, f"optim.{i}.{name}.{k}"))
    if ref:
        _load(run_dir, ref, targets)
    for st, k, table, key in fill:
        t = targets[key]
        st[k] = t.to_local() if table.sharded else t


def check_tables(ref: dict, model: nn.Module) -> None:
    have = {n: [t.num_rows, t.embedding_dim] for n, t in _all_tables(model)}
    for name, shape in ref["tables"].items():
        if have.get(name) != shape:
            raise RuntimeError(f"the checkpoint's sharded table {name} has shape {shape}, this model's {have.get(name)}")


def prune(run_dir: Path, keep: str | None) -> None:
    """Rank 0, after `last.pt` names `keep`: remove the tables folders of older checkpoints."""
    for d in (Path(run_dir) / "checkpoints").glob(f"{FOLDER_PREFIX}*"):
        if d.name != keep and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
