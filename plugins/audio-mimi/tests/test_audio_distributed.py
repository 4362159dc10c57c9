"""memory_basis over two gloo ranks (torchrun) equals the one-process run: train stages under
DDP, a fit stage on rank 0 broadcast to rank 1, sharded evaluation of dnll, direction_cos and
the rollout metric (whose max_norm reduces by max)."""

from __future__ import annotations

from pathlib import Path

from engram_core.testing.cli import run_cli
from engram_core.testing.dist import final_metrics, max_relative_difference, run_dirs, run_ranks

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "memory_basis.toml"
SHRUNK = [
    "data.synthetic={ dim = 12, speakers = 5, utterances = 2, frames = 70 }",
    "stages.0.steps=20",
    "stages.4.steps=20",
    "stages.6.steps=10",
    "stages.2.options={ iters = 2, max_items = 400 }",
    "metrics.2.segments=32",
]
# |x - y| / max(|y|, 1) over every final metric of every stage, 2 ranks vs 1 process: measured 2e-7
TOLERANCE = 1e-4


def test_memory_basis_on_two_ranks_equals_one_process(tmp_path):
    env = {"ENGRAM_CACHE": str(tmp_path / "cache")}
    one = run_cli(RECIPE, *SHRUNK, "--quiet", "--device", "cpu", "--out", str(tmp_path / "one"), plugins="audio-mimi", env=env)
    assert one.returncode == 0, one.stderr
    two = run_ranks(RECIPE, *SHRUNK, out=tmp_path / "two", plugins="audio-mimi", env=env)
    assert two.returncode == 0, two.stderr[-4000:]
    (d1,), (d2,) = run_dirs(tmp_path / "one"), run_dirs(tmp_path / "two")
    a, b = final_metrics(d2), final_metrics(d1)
    assert set(a) == {"param", "basis_init", "basis", "basis_joint"}
    diff = max_relative_difference(a, b)
    print(f"2 gloo ranks vs 1 process, memory_basis.toml (shrunk): max relative difference {diff:.2g}")
    assert diff < TOLERANCE
