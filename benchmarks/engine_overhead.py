"""Engine overhead: the same model, data and optimisation trained by engram's engine and by a
hand-written loop, like for like.

Both sides: the core's synthetic_dynamics data (dim 16) drawn with a torch.Generator seeded 0,
the mlp_gaussian head (hidden 256, 3 layers) built after torch.manual_seed(0), the Gaussian
NLL, AdamW (lr 1e-3, betas (0.9, 0.999), weight decay 0.01), a cosine schedule with 20 warm-up
steps (min_lr_ratio 0), gradient clipping at norm 1.0, batch 256, the loss read as a number
every 10 steps (the engine logs train/* then). Before timing, both sides run the same 30 steps
and their weights must agree (`weights_match`): the settings are matched, not just similar.

Per-step time is the slope of wall time against steps (two lengths), so fixed costs (build,
the final evaluation and checkpoint) drop out; the sides are interleaved, repeated, and the
median is reported with the spread (min, max) of the repeats.

    python benchmarks/engine_overhead.py [--device cpu|cuda] [--repeats 5] [--hidden 256]

Prints and saves JSON to benchmarks/results/engine_overhead-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engram_core.builtin.dynamics import MLPGaussianConfig, MLPGaussianHead, SyntheticDynamics, SyntheticDynamicsConfig
from engram_core.components import BuildContext
from engram_core.nn import gaussian_nll
from engram_core.recipe import load_recipe
from engram_core.train.engine import Engine

SETTINGS = dict(dim=16, n_sequences=128, length=128, layers=3, batch=256, lr=1e-3, weight_decay=0.01, warmup=20, clip=1.0, log_every=10)

RECIPE = """
[run]
name = "overhead"
seed = 0
device = "{device}"
[data]
type = "synthetic_dynamics"
dim = {dim}
n_sequences = {n_sequences}
length = {length}
[head]
type = "mlp_gaussian"
hidden = {hidden}
layers = {layers}
[[stages]]
name = "train"
objective = {{ type = "gaussian_nll" }}
steps = {steps}
batch_size = {batch}
optimizer = "adamw"
lr = {lr}
weight_decay = {weight_decay}
schedule = "cosine"
warmup_steps = {warmup}
grad_clip = {clip}
log_every = {log_every}
metrics = []
"""


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def engine_run(steps: int, device: str, hidden: int, tmp: Path) -> tuple[float, torch.nn.Module]:
    path = tmp / f"r{steps}.toml"
    path.write_text(RECIPE.format(device=device, hidden=hidden, steps=steps, **SETTINGS))
    rec = load_recipe(path)
    run_dir = tmp / f"run-{steps}-{time.perf_counter_ns()}"
    run_dir.mkdir()
    eng = Engine(rec, run_dir, show_progress=False)
    eng.build()
    sync(device)
    t = time.perf_counter()
    eng.run()
    sync(device)
    return time.perf_counter() - t, eng.head


def lr_factor(step: int, steps: int) -> float:
    """The engine's cosine schedule with linear warm-up, written out."""
    w = SETTINGS["warmup"]
    if step < w:
        return (step + 1) / w
    t = min(1.0, (step - w) / max(1, steps - w))
    return 0.5 * (1 + math.cos(math.pi * t))


def bare_run(steps: int, device: str, hidden: int) -> tuple[float, torch.nn.Module]:
    s = SETTINGS
    torch.manual_seed(0)
    data = SyntheticDynamics(SyntheticDynamicsConfig(dim=s["dim"], n_sequences=s["n_sequences"], length=s["length"]))
    head = MLPGaussianHead(MLPGaussianConfig(hidden=hidden, layers=s["layers"]), BuildContext(spec=data.spec)).to(device)
    params = list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s["lr"], betas=(0.9, 0.999), weight_decay=s["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, steps))
    gen = torch.Generator().manual_seed(0)
    sync(device)
    t = time.perf_counter()
    for step in range(steps):
        batch = data.sample("train", s["batch"], gen)
        z, dz = batch["z"].to(device, non_blocking=True), batch["dz"].to(device, non_blocking=True)
        mu, ls = head(z)
        loss = gaussian_nll(mu, ls, dz)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, s["clip"])
        opt.step()
        sched.step()
        if (step + 1) % s["log_every"] == 0:
            _ = loss.item()  # a hand-written loop logs too
    sync(device)
    return time.perf_counter() - t, head


def weights_match(device: str, hidden: int, tmp: Path) -> float:
    """Largest |difference| between the two sides' weights after the same 30 steps."""
    _, a = engine_run(30, device, hidden, tmp)
    _, b = bare_run(30, device, hidden)
    return max(float((p - q).abs().max()) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--short", type=int, default=200)
    ap.add_argument("--long", type=int, default=1200)
    args = ap.parse_args()
    if args.repeats < 5:
        print(f"note: {args.repeats} repeats (the published figure uses >= 5)")
    eng_ms, bare_ms, ratios = [], [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        diff = weights_match(args.device, args.hidden, tmp)  # also the warm-up (allocator, kernels)
        span = args.long - args.short
        for _ in range(args.repeats):
            e = (engine_run(args.long, args.device, args.hidden, tmp)[0] - engine_run(args.short, args.device, args.hidden, tmp)[0]) / span
            b = (bare_run(args.long, args.device, args.hidden)[0] - bare_run(args.short, args.device, args.hidden)[0]) / span
            eng_ms.append(e * 1e3)
            bare_ms.append(b * 1e3)
            ratios.append(e / b)
    overhead = [(r - 1) * 100 for r in ratios]
    result = {
        "benchmark": "engine_overhead",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "settings": {**SETTINGS, "hidden": args.hidden, "optimizer": "adamw", "schedule": "cosine"},
        "weights_match_max_abs_diff": diff,
        "steps": [args.short, args.long],
        "repeats": args.repeats,
        "engine_ms_per_step": spread(eng_ms),
        "bare_ms_per_step": spread(bare_ms),
        "overhead_percent": spread(overhead),  # per repeat (interleaved pairs), then median and range
        "target_percent": 2.0,
        "engine_ms_each": [round(x, 4) for x in eng_ms],
        "bare_ms_each": [round(x, 4) for x in bare_ms],
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / f"engine_overhead-{args.device.split(':')[0]}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
