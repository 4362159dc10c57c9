"""Operators a training step of `recipes/rollout_vmf.toml` dispatches, counted on the CPU.

On a GPU an eager step of this 64-dimensional latent model is its kernel launches, one at a
time from Python, so the count says what the step costs there without a GPU. Counted with
torch.profiler under the accelerator policy (`as_on_an_accelerator`: the vMF sampler draws
its rejection rounds 16 at a time, as on a GPU), as the difference between whole runs that
differ only in one stage's steps (10 against 30), so start-up and evaluation cancel:
operators that launch a kernel (`engine_step_ops.NO_KERNEL` left out), and the host reads
(`item`, `_local_scalar_dense`, `is_nonzero`: a `bool()` of a tensor) per step. The optimiser is torch's CPU AdamW (for-loop; its
`item` reads are the CPU's step counters, which a GPU's fused AdamW does not make).

    python benchmarks/rollout_step_ops.py      # → benchmarks/results/rollout_step_ops-cpu.json
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import write_result  # noqa: E402
from engine_step_ops import NO_KERNEL, launching, outermost_aten  # noqa: E402

RECIPE = HERE.parent / "recipes" / "rollout_vmf.toml"
READS = ("item", "_local_scalar_dense", "is_nonzero")


def run_ops(overrides: list[str]) -> collections.Counter:
    """The outermost aten operators of one whole run of the recipe (no eval metrics)."""
    from engram_core.cli import run_main
    from engram_core.testing.host_reads import as_on_an_accelerator

    with as_on_an_accelerator(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rc = run_main([str(RECIPE), "--quiet", "--out", tempfile.mkdtemp(), "metrics=[]", *overrides])
    if rc != 0:
        raise SystemExit(f"rollout_vmf exited {rc}")
    return outermost_aten(prof)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs=2, default=[10, 30], metavar=("FEW", "MORE"))
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/rollout_step_ops-cpu.json)")
    args = p.parse_args(argv)
    few, more = args.steps
    base = run_ops([f"stages.0.steps={few}", f"stages.2.steps={few}"])
    info = {"benchmark": "rollout_step_ops", "recipe": "recipes/rollout_vmf.toml", "steps_compared": [few, more], "stages": {}}
    for index, stage in ((0, "one_step"), (2, "rollout_finetune")):
        other = run_ops([f"stages.{index}.steps={more}", f"stages.{2 - index}.steps={few}"])
        per_step = {k: (other[k] - base[k]) / (more - few) for k in set(base) | set(other) if other[k] != base[k]}
        reads = sum(per_step.get(k, 0.0) for k in READS)
        top = dict(sorted(((k, round(v, 1)) for k, v in per_step.items() if k not in NO_KERNEL), key=lambda kv: -kv[1])[:15])
        info["stages"][stage] = {"launching_ops_per_step": round(launching(collections.Counter(per_step)), 1),
                                 "host_reads_per_step": round(reads, 1), "top_operators": top}
        print(f"{stage:17s} kernel-launching operators per step {info['stages'][stage]['launching_ops_per_step']:8.1f}   "
              f"host reads per step {reads:5.1f}")
        print("  most: " + ", ".join(f"{k} {v:g}" for k, v in top.items()))
    write_result(info, args.out, "rollout_step_ops-cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
