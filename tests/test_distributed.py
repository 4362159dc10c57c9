"""One run over two gloo ranks (real torchrun processes) equals the one-process run.

The 2-rank minimal run is made once (module fixture) and compared with: the one-process run
(float tolerance), and a 2-rank run killed with SIGKILL on one rank after its first checkpoint,
then resumed (exactly). The metric reduction is checked exactly on a hand-made metric over
two ranks (this file run by torchrun).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist

from engram_core.components import Metric, reduce_states
from engram_core.errors import RecipeError
from engram_core.run.distributed import (
    Dist,
    check_batch_split,
    leave_process_group,
    micro_batches,
    slice_batch,
    wrap_train_step,
)
from engram_core.testing.cli import run_cli
from engram_core.testing.dist import (
    alive,
    final_metrics,
    max_relative_difference,
    rank_pids,
    run_dirs,
    run_ranks,
    start_ranks,
)

MINIMAL = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"
SHORT = ["stages.0.steps=80", "stages.0.eval_every=40", "stages.0.checkpoint_every=20", "stages.0.warmup_steps=10"]
# 2 gloo ranks vs 1 process, |x - y| / max(|y|, 1) over every final metric: measured about
# 1e-5 on minimal.toml (the test prints it, pytest -s); float32 gradients summed in another order.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks") / "runs"
    r = run_ranks(MINIMAL, *SHORT, out=out)
    assert r.returncode == 0, r.stderr[-4000:]
    dirs = run_dirs(out)
    assert len(dirs) == 1, dirs  # one run, not one per rank
    return dirs[0]


def test_two_ranks_are_one_run_that_equals_one_process(two_rank_run, tmp_path):
    r = run_cli(MINIMAL, *SHORT, "--quiet", "--device", "cpu", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    (one,) = run_dirs(tmp_path)
    diff = max_relative_difference(final_metrics(two_rank_run), final_metrics(one))
    print(f"2 gloo ranks vs 1 process, minimal.toml ({SHORT[0]}): max relative difference {diff:.2g}")
    assert diff < TOLERANCE
    env = json.loads((two_rank_run / "env.json").read_text())["distributed"]
    assert env["world_size"] == 2 and env["backend"] == "gloo"
    assert [d["rank"] for d in env["devices"]] == [0, 1]
    summary = json.loads((two_rank_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert len(list(two_rank_run.glob("events.out.tfevents.*"))) == 1  # rank 0 alone logs
    lines = (two_rank_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((one / "metrics.jsonl").read_text().splitlines())  # no record twice


def test_kill_one_rank_then_resume_ends_exactly_as_the_uninterrupted_run(two_rank_run, tmp_path):
    out = tmp_path / "runs"
    proc = start_ranks(MINIMAL, *SHORT, out=out)
    try:
        pids = rank_pids(proc.pid)
        deadline = time.monotonic() + 120
        while not list(out.glob("*/*/checkpoints/last.pt")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert not alive(pids[0])  # torchrun stopped the surviving rank
    err = proc.stderr.read()
    assert "error: rank 1 was killed by SIGKILL; torchrun stopped the other ranks" in err and "Traceback" not in err, err
    (run_dir,) = run_dirs(out)
    summary = run_dir / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] != "completed"
    r = run_ranks("--resume", run_dir)
    assert r.returncode == 0, r.stderr[-4000:]
    assert final_metrics(run_dir) == final_metrics(two_rank_run)  # gloo on CPU: exactly


def test_bad_input_on_two_ranks_is_one_line(tmp_path):
    r = run_ranks(MINIMAL, "stages.0.batch_size=127", out=tmp_path / "runs")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {MINIMAL}: stages.0.batch_size: 127 does not split into 2 rank(s) x 1 micro-batch(es); use 126 or 128"
    assert not run_dirs(tmp_path / "runs")


# ---- metric state reduction over two processes ------------------------------------------------


class Handmade(Metric):
    """Every reduction kind: sums (float, int, tensor, dict), max, a list (order), a set."""

    dist_reduce_fx = {"largest": "max"}

    def __init__(self):
        self.note = "kept"  # not a state: reset does not assign it

    def reset(self):
        self.total = 0.0
        self.count = 0
        self.vector = torch.zeros(3, dtype=torch.float64)
        self.by_parity: dict[str, float] = {}
        self.largest = -math.inf
        self.seen: list[float] = []
        self.ids: set[int] = set()

    def update(self, model, batch):
        x = batch["x"]
        self.total += float(x.sum())
        self.count += x.numel()
        self.vector += torch.stack([x.sum(), x.max(), x.min()])
        for v in x.tolist():
            key = "even" if int(v * 4) % 2 == 0 else "odd"
            self.by_parity[key] = self.by_parity.get(key, 0.0) + v
        self.largest = max(self.largest, float(x.max()))
        self.seen.extend(x.tolist())
        self.ids.update(int(v * 4) % 7 for v in x.tolist())

    def compute(self):
        return {"mean": self.total / self.count, "largest": self.largest}


def _batches():
    # multiples of 1/4: every sum is exact in float64, so reduced and one-process states are equal
    g = torch.Generator().manual_seed(0)
    values = torch.randint(-400, 400, (7 * 5,), generator=g).double() / 4
    return [{"x": values[i : i + 5]} for i in range(0, 35, 5)]  # 7 batches: uneven over 2 ranks


def _states(m: Handmade) -> dict:
    return {n: (getattr(m, n).tolist() if isinstance(getattr(m, n), torch.Tensor) else getattr(m, n)) for n in m.state_names()}


class _Tiny(torch.nn.Module):
    """A shared layer DDP syncs, and a table the component manages itself (left out of DDP)."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(3, 1)
        self.table = torch.nn.Parameter(torch.zeros(4))

    def self_managed_parameters(self):
        return [self.table]


class _Square(torch.nn.Module):
    def forward(self, model, batch):
        y = model.shared(batch["x"]).squeeze(-1) + model.table[batch["i"]]
        return (y**2).mean(), {}


def _ddp_grads(dist: Dist) -> dict:
    """One backward on rank-specific data under DDP: the shared grads are averaged, the table's not."""
    torch.manual_seed(dist.rank)  # different initial weights: DDP must broadcast rank 0's
    model = _Tiny()
    forward, _ = wrap_train_step(model, _Square(), [model], dist, torch.device("cpu"))
    assert model.table.requires_grad
    batch = {"x": torch.full((2, 3), float(dist.rank + 1)), "i": torch.tensor([dist.rank, dist.rank])}
    loss, _ = forward(batch)
    loss.backward()
    return {"shared": model.shared.weight.grad.flatten().tolist(), "table": model.table.grad.tolist(), "weight": model.shared.weight.flatten().tolist()}


def _reduce_main(out_file: str) -> None:
    """Under torchrun: each rank updates on its block of batches, then the states are reduced."""
    torch_dist.init_process_group("gloo")
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    finished = False
    try:
        dist = Dist(rank, world, rank, "gloo")
        m = Handmade()
        m.reset()
        for b in dist.block(_batches()):
            m.update(None, b)
        m.dist_reduce(dist)
        grads = dist.all_gather_object(_ddp_grads(dist))
        if rank == 0:
            with open(out_file, "w") as f:
                states = {k: sorted(v) if isinstance(v, set) else v for k, v in _states(m).items()}
                json.dump({"states": states, "note": m.note, "grads": grads}, f)
        finished = True
    finally:
        leave_process_group(finished)  # drop the DDP wrapper, wait, then leave: see its docstring


def test_metric_states_reduce_exactly_and_ddp_leaves_self_managed_parameters_alone(tmp_path):
    one = Handmade()
    one.reset()
    for b in _batches():
        one.update(None, b)
    expected = {k: sorted(v) if isinstance(v, set) else v for k, v in _states(one).items()}
    assert set(expected) == {"total", "count", "vector", "by_parity", "largest", "seen", "ids"}
    out = tmp_path / "reduced.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["note"] == "kept"
    assert got["states"] == expected  # the list in one-process order, max not summed
    g0, g1 = got["grads"]
    assert g0["weight"] == g1["weight"]  # DDP started both ranks from rank 0's weights
    assert g0["shared"] == g1["shared"]  # all-reduced
    assert g0["table"] != g1["table"] and g0["table"][1] == 0.0 and g1["table"][1] != 0.0  # local only


# ---- the pieces, in one process ---------------------------------------------------------------


def test_reduce_states_by_kind():
    assert reduce_states([1, 2, 3]) == 6
    assert reduce_states([True, False]) is True
    assert reduce_states([{"a": 1}, {"a": 2, "b": 3}]) == {"a": 3, "b": 3}
    assert reduce_states([[1], [2, 3]]) == [1, 2, 3]
    assert reduce_states([{1}, {2}]) == {1, 2}
    assert reduce_states([1.0, 5.0], "max") == 5.0
    assert reduce_states([None, None]) is None
    with pytest.raises(ValueError, match="unknown dist_reduce_fx"):
        reduce_states([1, 2], "median")


def test_shards_and_micro_batches_cover_the_global_batch():
    batch = {"z": torch.arange(8).reshape(8, 1), "terms": [{"ids": torch.arange(8)}], "shared": torch.ones(3), "names": list("abcdefgh"), "k": 4}
    parts = [slice_batch(batch, 8, r * 4, (r + 1) * 4) for r in range(2)]
    assert torch.equal(torch.cat([p["z"] for p in parts]), batch["z"])
    assert parts[1]["names"] == list("efgh") and parts[1]["terms"][0]["ids"].tolist() == [4, 5, 6, 7]
    assert parts[0]["shared"].shape == (3,) and parts[0]["k"] == 4  # not per-example: kept whole
    micro = micro_batches(parts[0], 4, 2)
    assert [m["z"].flatten().tolist() for m in micro] == [[0, 1], [2, 3]]


def test_a_batch_that_does_not_split_is_a_one_line_error():
    check_batch_split(128, 2, 2, "stages.0", "r.toml")
    with pytest.raises(RecipeError, match=r"stages.0.batch_size: 100 does not split into 3 rank\(s\) x 1 micro-batch\(es\); use 99 or 102"):
        check_batch_split(100, 3, 1, "stages.0", "r.toml")


def test_grad_accum_matches_one_big_batch(tmp_path):
    base = ["stages.0.steps=40", "stages.0.eval_every=0", "stages.0.checkpoint_every=0", "--quiet", "--device", "cpu"]
    a = run_cli(MINIMAL, *base, "--out", str(tmp_path / "a"))
    b = run_cli(MINIMAL, *base, "stages.0.grad_accum=4", "--out", str(tmp_path / "b"))
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    (da,), (db,) = run_dirs(tmp_path / "a"), run_dirs(tmp_path / "b")
    assert max_relative_difference(final_metrics(db), final_metrics(da)) < TOLERANCE
    bad = run_cli(MINIMAL, *base, "stages.0.grad_accum=3", "--out", str(tmp_path / "c"))
    assert bad.returncode == 2 and "stages.0.batch_size: 128 does not split into 1 rank(s) x 3 micro-batch(es)" in bad.stderr


if __name__ == "__main__":  # torchrun tests/test_distributed.py OUT.json (see the reduction test)
    _reduce_main(sys.argv[1])
