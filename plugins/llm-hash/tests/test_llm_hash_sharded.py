"""memory.placement = "sharded" from a recipe, over 2 gloo ranks (real torchrun processes).

One 2-rank run of a small engram_hash recipe (train the base, then the memory with its
table's rows split over the ranks; evaluations with loss and generation-based exact match)
is made once and compared with:
- the same recipe with the table on the device, one process (within float tolerance);
- a 2-rank run killed with SIGKILL after a mid-run checkpoint, then resumed on 2 ranks
  (exactly) and, from a copy of the same run directory, on 1 process (within tolerance):
  a checkpoint written by 2 ranks loads on 2 and on 1.
The shipped recipe kv_memorisation.toml runs with memory.placement=sharded --nproc 2.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

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


def test_shipped_recipe_runs_sharded_on_two_ranks(tmp_path):
    short = ["memory.placement=sharded", "stages.0.steps=4", "stages.2.steps=4", "stages.2.eval_every=0", "data.n_synthetic=40"]
    r = run_ranks(ROOT / "recipes" / "kv_memorisation.toml", *short, out=tmp_path / "runs", plugins=None)
    assert r.returncode == 0, r.stderr[-4000:]
    assert run_dirs(tmp_path / "runs")
