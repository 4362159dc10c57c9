"""Engine overhead: the same model and data trained by engram's engine and by a bare loop.

Both sides use the core's synthetic_dynamics data, the mlp_gaussian head and the Gaussian
NLL, AdamW, batch 256, on the same device. Per-step time is the slope of wall time against
steps (two lengths), so fixed costs (building, the final checkpoint) drop out; the two
sides are interleaved and repeated, and medians are reported.

    python benchmarks/engine_overhead.py [--device cpu|cuda] [--repeats 5] [--hidden 256]

Prints and saves JSON to benchmarks/results/engine_overhead-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engram_core.builtin.dynamics import MLPGaussianConfig, MLPGaussianHead, SyntheticDynamics, SyntheticDynamicsConfig
from engram_core.components import BuildContext
from engram_core.engine import Engine
from engram_core.nn import gaussian_nll
from engram_core.recipe import load_recipe

RECIPE = """
[run]
name = "overhead"
device = "{device}"
[data]
type = "synthetic_dynamics"
dim = 16
n_sequences = 128
length = 128
[head]
type = "mlp_gaussian"
hidden = {hidden}
layers = 3
[[stages]]
name = "train"
objective = {{ type = "gaussian_nll" }}
steps = {steps}
batch_size = 256
lr = 1e-3
log_every = 10
"""


def engine_time(steps: int, device: str, hidden: int, tmp: Path) -> float:
    path = tmp / f"r{steps}.toml"
    path.write_text(RECIPE.format(device=device, hidden=hidden, steps=steps))
    rec = load_recipe(path)
    run_dir = tmp / f"run-{steps}-{time.perf_counter_ns()}"
    run_dir.mkdir()
    eng = Engine(rec, run_dir, show_progress=False)
    eng.build()
    t = time.perf_counter()
    eng.run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bare_time(steps: int, device: str, hidden: int) -> float:
    torch.manual_seed(0)
    data = SyntheticDynamics(SyntheticDynamicsConfig(dim=16, n_sequences=128, length=128))
    head = MLPGaussianHead(MLPGaussianConfig(hidden=hidden, layers=3), BuildContext(spec=data.spec)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for step in range(steps):
        batch = data.sample("train", 256, gen)
        z, dz = batch["z"].to(device), batch["dz"].to(device)
        mu, ls = head.predict(z)
        loss = gaussian_nll(mu, ls, dz)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            _ = loss.item()  # a hand-written loop logs too
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--short", type=int, default=200)
    ap.add_argument("--long", type=int, default=1200)
    args = ap.parse_args()
    eng_slopes, bare_slopes = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bare_time(50, args.device, args.hidden)  # warm-up (allocator, kernels)
        engine_time(50, args.device, args.hidden, tmp)
        for _ in range(args.repeats):
            e = (engine_time(args.long, args.device, args.hidden, tmp) - engine_time(args.short, args.device, args.hidden, tmp)) / (args.long - args.short)
            b = (bare_time(args.long, args.device, args.hidden) - bare_time(args.short, args.device, args.hidden)) / (args.long - args.short)
            eng_slopes.append(e)
            bare_slopes.append(b)
    e_med, b_med = statistics.median(eng_slopes), statistics.median(bare_slopes)
    result = {
        "benchmark": "engine_overhead",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "hidden": args.hidden,
        "steps": [args.short, args.long],
        "engine_ms_per_step": round(e_med * 1e3, 4),
        "bare_ms_per_step": round(b_med * 1e3, 4),
        "overhead_ratio": round(e_med / b_med, 4),
        "overhead_percent": round((e_med / b_med - 1) * 100, 2),
        "target_percent": 2.0,
        "engine_ms_each": [round(x * 1e3, 4) for x in eng_slopes],
        "bare_ms_each": [round(x * 1e3, 4) for x in bare_slopes],
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / f"engine_overhead-{args.device.split(':')[0]}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
