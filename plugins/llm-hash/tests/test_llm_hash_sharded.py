"""memory.placement = "sharded" from a recipe, over 2 gloo ranks (real torchrun processes).

One 2-rank run of a small engram_hash recipe (train the base, then the memory with its
table's rows split over the ranks; evaluations with loss and generation-based exact match)
is made once and compared with:
- the same recipe with the table on the device, one process (within float tolerance);
- a 2-rank run killed with SIGKILL after a mid-run checkpoint, then resumed on 2 ranks
  (exactly) and, from a copy of the same run directory, on 1 process (within tolerance):
  a checkpoint written by 2 ranks loads on 2 and on 1.
The shipped recipe kv_memorisation.toml runs with memory.placement=sharded --nproc 2.
And, on the memory itself (this file run by torchrun): forward, every gradient and an Adam
step of the sharded memory on 2 ranks equal the device memory on the whole batch to 1e-6.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engram_core.run.distributed import leave_process_group
from engram_core.testing.cli import run_cli
from engram_core.testing.dist import final_metrics, max_relative_difference, rank_pids, run_dirs, run_ranks, start_ranks

ROOT = Path(__file__).resolve().parents[3]
RECIPE = """
[run]
name = "sharded_small"
seed = 3

[data]
type = "exact_match"
n_synthetic = 60
categories = ["synthetic"]
pretrain_fraction = 0.5
valid_fraction = 0.0
test_fraction = 0.1

[head]
type = "tiny_causal_lm"
dim = 32
n_layers = 2
n_heads = 2

[memory]
type = "engram_hash"
memory_size = 4099
layers = [0, 1]
orders = [2, 3]
heads_per_order = 2
slot_dim = 8
placement = "sharded"

[[stages]]
name = "base"
objective = { type = "completion_ce" }
split = "pretrain"
memory = false
train = ["head.*"]
steps = 10
batch_size = 8
lr = 2e-3
metrics = []

[[stages]]
name = "memory"
objective = { type = "completion_ce" }
split = "train"
eval_split = "seen"
train = ["memory.*"]
param_groups = [{ params = ["memory.*.table.weight"], lr = 1e-2, weight_decay = 0.0 }]
optimizer = "adam"
steps = 24
batch_size = 8
lr = 2e-3
grad_clip = 1.0
eval_every = 12
checkpoint_every = 6

[[metrics]]
type = "loss"
num_examples = 16

[[metrics]]
type = "exact_match"
max_examples = 7
"""
# 2 ranks vs 1 process: float32 gradients summed in another order (test_distributed's bound)
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "sharded_small.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def two_rank_run(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("two") / "runs"
    r = run_ranks(recipe, out=out, plugins=None)
    assert r.returncode == 0, r.stderr[-4000:]
    (run_dir,) = run_dirs(out)
    return run_dir


def _metrics_without_telemetry(run_dir: Path) -> dict:
    """Final metrics minus telemetry: memory/* (slot usage counts each rank's own slice and
    restarts on resume) and generation time per token."""
    return {s: {k: v for k, v in m.items() if not k.startswith("memory/") and "gen_ms" not in k} for s, m in final_metrics(run_dir).items()}


def test_two_rank_sharded_run_equals_one_process_on_the_device(recipe, two_rank_run, tmp_path):
    r = run_cli(recipe, "memory.placement=device", "--quiet", "--device", "cpu", "--out", str(tmp_path), plugins=None)
    assert r.returncode == 0, r.stderr[-3000:]
    (one,) = run_dirs(tmp_path)
    a, b = _metrics_without_telemetry(two_rank_run), _metrics_without_telemetry(one)
    diff = max_relative_difference(a, b)
    print(f"2 gloo ranks sharded vs 1 process device: max relative difference {diff:.2g}")
    assert diff < TOLERANCE, (a, b)
    assert "eval/loss" in a["memory"] and any(k.startswith("eval/exact_match") for k in a["memory"])
    folders = list((two_rank_run / "checkpoints").glob("tables-*"))
    assert [f.name for f in folders] == ["tables-s1-24-done"]  # older ones pruned once last.pt moved on
    assert sorted(p.name for p in folders[0].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # each rank its rows


def test_kill_mid_run_then_resume_on_two_ranks_and_on_one(recipe, two_rank_run, tmp_path):
    out = tmp_path / "runs"
    proc = start_ranks(recipe, out=out, plugins=None)
    try:
        pids = rank_pids(proc.pid)
        deadline = time.monotonic() + 150
        while True:  # a mid-stage checkpoint of the memory stage: its tables folder is named in last.pt
            if any(p.name.startswith("tables-s1-") and not p.name.endswith("done") for p in out.glob("*/*/checkpoints/tables-*")):
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)  # let last.pt name it
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    (run_dir,) = run_dirs(out)
    assert json.loads((run_dir / "summary.json").read_text())["status"] != "completed" if (run_dir / "summary.json").exists() else True
    copy = tmp_path / "copy" / run_dir.name
    shutil.copytree(run_dir, copy)
    r = run_ranks("--resume", run_dir, plugins=None)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _metrics_without_telemetry(run_dir) == _metrics_without_telemetry(two_rank_run)  # 2 ranks, gloo on CPU: exactly
    r1 = run_cli("--resume", str(copy), "--quiet", "--device", "cpu", plugins=None)
    assert r1.returncode == 0, r1.stderr[-3000:]
    diff = max_relative_difference(_metrics_without_telemetry(copy), _metrics_without_telemetry(two_rank_run))
    print(f"resumed on 1 process from a 2-rank checkpoint: max relative difference {diff:.2g}")
    assert diff < TOLERANCE


def test_prepopulating_a_table_split_over_ranks_is_one_line_on_every_rank(tmp_path):
    fit = RECIPE.replace('[[stages]]\nname = "memory"', '[[stages]]\nname = "populate"\nkind = "fit"\ntarget = "memory"\naction = "fit"\noptions = { from_split = "train" }\n\n[[stages]]\nname = "memory"', 1)
    assert 'name = "populate"' in fit
    path = tmp_path / "fit.toml"
    path.write_text(fit)
    r = run_ranks(path, "stages.0.steps=2", out=tmp_path / "runs", plugins=None)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"error: {path}: stages.1.options.placement: this action reads every row of the table" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_shipped_recipe_runs_sharded_on_two_ranks(tmp_path):
    short = ["memory.placement=sharded", "stages.0.steps=4", "stages.2.steps=4", "stages.2.eval_every=0", "data.n_synthetic=40"]
    r = run_ranks(ROOT / "recipes" / "kv_memorisation.toml", *short, out=tmp_path / "runs", plugins=None)
    assert r.returncode == 0, r.stderr[-4000:]
    assert run_dirs(tmp_path / "runs")


# ---- the memory itself over 2 ranks (this file under torchrun) ---------------------------------

STEPS = 3


def _memory_steps(placement: str, rank: int, world: int) -> list[dict]:
    """STEPS Adam steps of a 2-layer engram_hash memory on this rank's slice of fixed batches
    (padding included); replicated gradients are averaged over ranks as DDP does."""
    import torch.distributed as torch_dist
    from llm_hash_helpers import memory

    torch.manual_seed(0)
    mem = memory(layers=[0, 1], memory_size=1009, placement=placement)
    opt = torch.optim.Adam(mem.parameters(), lr=1e-2)
    records = []
    for s in range(STEPS):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, 50, (8, 12), generator=g)
        hidden = torch.randn(8, 12, 16, generator=g)
        mask = torch.ones(8, 12, dtype=torch.long)
        mask[1, :3] = 0  # left padding on one row
        per = 8 // world
        sl = slice(rank * per, (rank + 1) * per)
        out = mem.apply_layer(1, mem.apply_layer(0, hidden[sl], ids[sl], mask[sl]), ids[sl], mask[sl])
        loss = out.pow(2).sum(-1).mean()  # gradients well above Adam's eps: near eps its step amplifies rounding
        opt.zero_grad()
        loss.backward()
        if world > 1:
            with torch.no_grad():
                for name, p in mem.named_parameters():
                    if p.grad is not None and not name.endswith("table.weight"):
                        torch_dist.all_reduce(p.grad)
                        p.grad /= world
        grads = {n: p.grad.clone() for n, p in mem.named_parameters() if p.grad is not None}
        opt.step()
        records.append({"out": out.detach(), "grads": grads, "params": {n: p.detach().clone() for n, p in mem.named_parameters()}})
    return records


def _memory_main(out_file: str) -> None:
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    finished = False
    try:
        ref = _memory_steps("device", 0, 1)  # the whole batch, one table (every rank computes it)
        got = _memory_steps("sharded", rank, world)
        mem_rows = {}
        worst: dict[str, float] = {}
        per = 8 // world
        for r, g in zip(ref, got):
            worst["forward"] = max(worst.get("forward", 0.0), float((g["out"] - r["out"][rank * per : (rank + 1) * per]).abs().max()))
            for n, gr in g["grads"].items():
                want = r["grads"][n]
                if n.endswith("table.weight"):
                    rows = mem_rows.setdefault(n, _owned(n, world, rank, want.shape[0]))
                    want = want[rows]
                worst["backward"] = max(worst.get("backward", 0.0), float((gr - want).abs().max()))
            for n, p in g["params"].items():
                want = r["params"][n]
                if n.endswith("table.weight"):
                    want = want[mem_rows.get(n, _owned(n, world, rank, want.shape[0]))]
                worst["step"] = max(worst.get("step", 0.0), float((p - want).abs().max()))
                worst["step:" + n] = max(worst.get("step:" + n, 0.0), float((p - want).abs().max()))
        worst["grads_compared"] = len(got[0]["grads"])
        results = [None] * world
        torch_dist.all_gather_object(results, worst)
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
        finished = True
    finally:
        leave_process_group(finished)  # gc, barrier, then leave: see its docstring


def _owned(name: str, world: int, rank: int, rows: int) -> slice:
    from engram_core.tables.sharded_rows import RowRange

    r = RowRange(rows, rank, world)
    return slice(r.start, r.stop)


def test_sharded_memory_on_two_ranks_equals_device_memory(tmp_path):
    out = tmp_path / "memory.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank, worst in enumerate(json.loads(out.read_text())):
        print(f"rank {rank}: max |difference| forward {worst['forward']:.2g}, gradients {worst['backward']:.2g}, after Adam {worst['step']:.2g}")
        assert worst["grads_compared"] >= 8, worst  # tables, projections, norms, conv, gate
        for what in ("forward", "backward", "step"):
            assert worst[what] <= 1e-6, (rank, what, {k: v for k, v in worst.items() if v > 1e-7})


if __name__ == "__main__":  # torchrun test_llm_hash_sharded.py OUT.json
    _memory_main(sys.argv[1])
