"""Engine scaling: samples/s of one run as `engram-run` gives it, read from the run's own
`throughput/samples_per_s` (global over ranks) in TensorBoard.

    python benchmarks/engine_scale.py cpu [--ranks 1 2 4] [--threads 16] [--steps 120]
        1 process vs N gloo ranks on the CPU, the same recipe (mlp_gaussian, hidden 512, batch
        1024); the machine's threads are shared out: each of N ranks gets threads // N.
    python benchmarks/engine_scale.py gpu [--steps 150]
        1 GPU: fp32 eager vs bf16 eager vs bf16 + torch.compile on a compute-bound recipe, the
        core CausalTransformer at width 1024 (llm-hash's tiny_causal_lm, 8 blocks, 16 heads,
        exact_match data, batch 128).

Each configuration is one real run (a subprocess: `python -m engram_core.run [--nproc N]`);
its samples/s is the median over its log windows after the first `--skip` (start-up, compile
warm-up), with the range of those windows as the spread. Prints and saves JSON to
benchmarks/results/engine_scale-<cpu|cuda>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CPU_RECIPE = """
[run]
name = "scale_cpu"
seed = 0
device = "cpu"
[data]
type = "synthetic_dynamics"
dim = 32
n_sequences = 256
length = 128
[head]
type = "mlp_gaussian"
hidden = {hidden}
layers = 3
[[stages]]
name = "train"
objective = {{ type = "gaussian_nll" }}
steps = {steps}
batch_size = {batch}
lr = 1e-3
weight_decay = 0.01
grad_clip = 1.0
log_every = 10
metrics = []
"""

GPU_RECIPE = """
[run]
name = "scale_gpu"
seed = 0
device = "cuda"
precision = "{precision}"
compile = {compile}
[data]
type = "exact_match"
n_synthetic = 300
[head]
type = "tiny_causal_lm"
dim = {dim}
n_layers = {layers}
n_heads = 16
[[stages]]
name = "train"
objective = {{ type = "completion_ce" }}
split = "pretrain"
steps = {steps}
batch_size = {batch}
lr = 3e-4
weight_decay = 0.01
grad_clip = 1.0
log_every = 10
metrics = []
"""


def run(recipe_text: str, tmp: Path, tag: str, nproc: int, threads: int, plugins: str | None) -> Path:
    path = tmp / f"{tag}.toml"
    path.write_text(recipe_text)
    out = tmp / tag
    cmd = [sys.executable, "-m", "engram_core.run", str(path), "--quiet", "--out", str(out)]
    if nproc > 1:
        cmd[3:3] = ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if plugins is not None:
        env["ENGRAM_PLUGINS"] = plugins
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{tag}: engram-run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    (run_dir,) = [p.parent for p in out.glob("*/*/summary.json")]
    return run_dir


def throughput(run_dir: Path, skip: int) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in ("throughput/samples_per_s", "throughput/steps_per_s", "throughput/tokens_per_s"):
        if tag not in acc.Tags()["scalars"]:
            continue
        values = [e.value for e in acc.Scalars(tag)][skip:]
        if values:
            out[tag.split("/")[1]] = {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2), "windows": len(values)}
    return out


def cpu(args) -> dict:
    threads = args.threads or os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.ranks:
            text = CPU_RECIPE.format(hidden=args.hidden, steps=args.steps, batch=args.batch)
            run_dir = run(text, Path(d), f"ranks{n}", n, max(1, threads // n), "")
            rows.append({"ranks": n, "threads_per_rank": max(1, threads // n), **throughput(run_dir, args.skip)})
            print(json.dumps(rows[-1]))
    base = rows[0]["samples_per_s"]["median"]
    for r in rows:
        r["speedup_vs_first"] = round(r["samples_per_s"]["median"] / base, 3)
    return {"benchmark": "engine_scale", "device": "cpu", "backend": "gloo", "threads": threads, "recipe": {"head": "mlp_gaussian", "hidden": args.hidden, "layers": 3, "batch": args.batch, "steps": args.steps}, "rows": rows}


def gpu(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu: CUDA is not available on this machine")
    rows = []
    configs = [("fp32", "false"), ("bf16", "false"), ("bf16", "true")]
    with tempfile.TemporaryDirectory() as d:
        for precision, comp in configs:
            text = GPU_RECIPE.format(precision=precision, compile=comp, dim=args.dim, layers=args.layers, steps=args.steps, batch=args.batch)
            tag = f"{precision}-{'compile' if comp == 'true' else 'eager'}"
            run_dir = run(text, Path(d), tag, 1, os.cpu_count() or 1, "llm-hash")
            rows.append({"config": tag, "precision": precision, "compile": comp == "true", **throughput(run_dir, args.skip)})
            print(json.dumps(rows[-1]))
    base = rows[0]["samples_per_s"]["median"]
    for r in rows:
        r["speedup_vs_fp32_eager"] = round(r["samples_per_s"]["median"] / base, 3)
    return {
        "benchmark": "engine_scale",
        "device": "cuda",
        "device_name": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "recipe": {"head": "tiny_causal_lm (engram_core.nn.CausalTransformer)", "dim": args.dim, "n_layers": args.layers, "n_heads": 16, "data": "exact_match", "batch": args.batch, "steps": args.steps},
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("where", choices=["cpu", "gpu"])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads shared out over the ranks (default: all cores)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=0, help="default: 1024 (cpu), 128 (gpu)")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="default: 120 (cpu), 150 (gpu)")
    ap.add_argument("--skip", type=int, default=2, help="log windows left out at the start (start-up, compilation)")
    args = ap.parse_args()
    args.batch = args.batch or (1024 if args.where == "cpu" else 128)
    args.steps = args.steps or (120 if args.where == "cpu" else 150)
    result = cpu(args) if args.where == "cpu" else gpu(args)
    result["command"] = " ".join(["python", "benchmarks/engine_scale.py", *sys.argv[1:]])
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / f"engine_scale-{'cpu' if args.where == 'cpu' else 'cuda'}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
