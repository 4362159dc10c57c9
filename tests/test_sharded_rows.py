"""The row-sharded table (engram_core.tables.sharded_rows): 2 gloo ranks equal one process.

One torchrun of this file (2 ranks) checks, against an ordinary nn.Embedding updated on the
whole global batch in one process: the initial rows, forward, backward (dense and sparse),
Adam / SparseAdam steps, the all-reduced clipping norm, an evaluation where the ranks read
unequal numbers of batches (`serve_peers`), and the state_dict hooks. Everything is within
1e-6; the worker writes what it compared and the test asserts on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from engram_core.run.distributed import leave_process_group
from engram_core.tables.row_tables import make_row_table
from engram_core.tables.sharded_rows import RowRange, ShardedEmbedding, clip_grad_norm_, serve_peers

ROWS, DIM, STEPS = 37, 5, 4


def _batches(step: int) -> torch.Tensor:
    """The global batch of ids at `step`: 16 x 6 ids of 37 rows (repeats, and rows of every rank)."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, ROWS, (16, 6), generator=g)


def _loss(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((rows - target) ** 2).sum(-1).mean()


def _reference(sparse: bool, clip: float) -> list[dict]:
    """One process, the ordinary table, the whole global batch: what every step should give."""
    table = torch.nn.Embedding(ROWS, DIM, sparse=sparse)
    torch.manual_seed(0)
    torch.nn.init.normal_(table.weight, std=0.02)
    opt = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(table.parameters(), lr=0.05)
    out = [{"rows": table.weight.detach().clone()}]
    for s in range(STEPS):
        ids = _batches(s)
        target = torch.full((ids.shape[0], ids.shape[1], DIM), 0.1 * (s + 1))
        loss = _loss(table(ids), target)
        opt.zero_grad()
        loss.backward()
        grad = table.weight.grad.to_dense().clone()
        norm = clip_grad_norm_([table.weight], clip) if clip and not sparse else None
        opt.step()
        out.append({"grad": grad, "rows": table.weight.detach().clone(), "norm": norm})
    return out


def _compare(sparse: bool, clip: float, rank: int, world: int) -> dict:
    ref = _reference(sparse, clip)
    torch.manual_seed(0)
    table = ShardedEmbedding(ROWS, DIM, init_std=0.02, sparse=sparse)
    lo, hi = table.rows.start, table.rows.stop
    opt = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(table.parameters(), lr=0.05)
    worst = {"init": float((table.weight - ref[0]["rows"][lo:hi]).abs().max())}
    for s in range(STEPS):
        ids = _batches(s)
        per = ids.shape[0] // world
        mine = ids[rank * per : (rank + 1) * per]
        target = torch.full((mine.shape[0], mine.shape[1], DIM), 0.1 * (s + 1))
        rows = table(mine)
        worst["forward"] = max(worst.get("forward", 0.0), float((rows - F.embedding(mine, ref[s]["rows"])).abs().max()))
        loss = _loss(rows, target)
        opt.zero_grad()
        loss.backward()
        grad = table.weight.grad.to_dense()
        worst["grad"] = max(worst.get("grad", 0.0), float((grad - ref[s + 1]["grad"][lo:hi]).abs().max()))
        if clip and not sparse:
            norm = clip_grad_norm_([table.weight], clip, table)
            worst["norm"] = max(worst.get("norm", 0.0), float((norm - ref[s + 1]["norm"]).abs()))
        opt.step()
        worst["step"] = max(worst.get("step", 0.0), float((table.weight - ref[s + 1]["rows"][lo:hi]).abs().max()))
    return worst


def _uneven_eval(rank: int, world: int) -> dict:
    """Rank r reads r + 1 batches without grad, then serves its peers: every read is right."""
    torch.manual_seed(0)
    table = ShardedEmbedding(ROWS, DIM, init_std=1.0)
    torch.manual_seed(0)
    full = torch.empty(ROWS, DIM).normal_(0.0, 1.0)
    worst = 0.0
    with torch.no_grad():
        for b in range(rank + 1):
            ids = _batches(10 + b)[:, : 2 + rank]
            worst = max(worst, float((table(ids) - full[ids]).abs().max()))
    served = serve_peers()
    return {"eval": worst, "served": served}


def _state_dict(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    table = make_row_table("sharded", ROWS, DIM)
    has_rows = "weight" in table.state_dict()
    whole = torch.arange(ROWS * DIM, dtype=torch.float32).view(ROWS, DIM)
    missing = table.load_state_dict({"weight": whole})  # a one-process state dict: our rows kept
    kept = torch.equal(table.weight.detach(), whole[table.rows.start : table.rows.stop])
    none = table.load_state_dict({})  # written by N ranks: the rows come from sharded_state
    return {"has_rows": has_rows, "kept": kept, "missing": list(missing.missing_keys) + list(none.missing_keys)}


def _main(out_file: str) -> None:
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    finished = False
    try:
        result = {
            "dense": _compare(False, 0.0, rank, world),
            "dense_clipped": _compare(False, 0.05, rank, world),
            "sparse": _compare(True, 0.0, rank, world),
            "uneven": _uneven_eval(rank, world),
            "state": _state_dict(rank, world),
        }
        results = [None] * world
        torch_dist.all_gather_object(results, result)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(results, f)
        finished = True
    finally:
        leave_process_group(finished)  # gc, barrier, then leave: see its docstring


def test_two_ranks_equal_one_process_table(tmp_path):
    out = tmp_path / "sharded.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())
    for rank, res in enumerate(results):
        for case in ("dense", "dense_clipped", "sparse"):
            for what, err in res[case].items():
                assert err <= 1e-6, (rank, case, what, err)
        assert "norm" in res["dense_clipped"]
        assert res["uneven"]["eval"] == 0.0
        assert res["state"] == {"has_rows": False, "kept": True, "missing": []}
    # rank 0 read 1 batch, rank 1 read 2: rank 0 answered rank 1's second read, then the final round
    assert [r["uneven"]["served"] for r in results] == [1, 0]


def test_one_process_is_an_ordinary_table():
    torch.manual_seed(0)
    table = ShardedEmbedding(ROWS, DIM, init_std=0.02)
    plain = torch.nn.Embedding(ROWS, DIM)
    torch.manual_seed(0)
    torch.nn.init.normal_(plain.weight, std=0.02)
    assert not table.sharded and table.self_managed_parameters() == []
    assert torch.equal(table.weight, plain.weight) and table.full_weight is table.weight
    ids = torch.randint(0, ROWS, (3, 4))
    assert torch.equal(table(ids), plain(ids))
    assert list(table.state_dict()) == ["weight"]
    assert serve_peers() == 0


def test_row_ranges_are_the_chunk_layout():
    for n, world in [(37, 2), (37, 3), (5, 4), (64, 8)]:
        ranges = [RowRange(n, r, world) for r in range(world)]
        chunks = torch.arange(n).chunk(world)
        assert [(g.start, g.stop) for g in ranges][: len(chunks)] == [(int(c[0]), int(c[-1]) + 1) for c in chunks]
        assert sum(g.local_rows for g in ranges) == n
        ids = torch.arange(n)
        assert ranges[0].counts_by_owner(ids).tolist() == [g.local_rows for g in ranges]


if __name__ == "__main__":  # torchrun tests/test_sharded_rows.py OUT.json
    _main(sys.argv[1])
