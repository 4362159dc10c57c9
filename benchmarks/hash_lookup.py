"""Tokens/s of the Engram hash memory (hash → gather → project → gate), forward and
backward, for table sizes 10^3 ... 10^7, with dense and sparse table gradients.

Time per token should stay flat with table size: addressing is O(1) per token and the
gather touches only the rows read. Dense gradients (a full-size grad tensor per step)
grow with the table; sparse ones do not.

    OMP_NUM_THREADS=1 python benchmarks/hash_lookup.py                 # CPU
    python benchmarks/hash_lookup.py --device cuda --tokens 16384      # GPU
Prints a table and writes JSON (--out, default hash_lookup-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from engram_llm_hash.hf import _DimsOnly
from engram_llm_hash.memory import EngramHashConfig, EngramHashMemory

from engram_core.components import BuildContext


def bench(size: int, sparse: bool, args, device) -> dict:
    cfg = EngramHashConfig(
        memory_size=size, layers=[0], orders=[2, 3], heads_per_order=args.heads, slot_dim=args.slot_dim, sparse=sparse, conv_kernel=4
    )
    torch.manual_seed(0)
    mem = EngramHashMemory(cfg, BuildContext(head=_DimsOnly(args.dim, args.vocab, 1))).to(device)
    for b in mem.blocks.values():
        b.track = False  # telemetry off: measure the memory itself
    b_, t_ = args.batch, args.tokens // args.batch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (b_, t_), generator=g).to(device)
    hidden = torch.randn(b_, t_, args.dim, generator=g).to(device).requires_grad_(True)

    def step():
        mem.zero_grad(set_to_none=False)
        out = mem.apply_layer(0, hidden, ids)
        out.float().pow(2).mean().backward()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(args.iters):
        step()
    sync()
    dt = (time.perf_counter() - t) / args.iters
    # forward only
    with torch.no_grad():
        sync()
        t = time.perf_counter()
        for _ in range(args.iters):
            mem.apply_layer(0, hidden, ids)
        sync()
        dt_f = (time.perf_counter() - t) / args.iters
    rows = next(iter(mem.blocks.values())).table.weight.shape[0]
    return {
        "table_size": size,
        "rows": rows,
        "sparse": sparse,
        "tokens": b_ * t_,
        "fwd_bwd_s": dt,
        "fwd_s": dt_f,
        "fwd_bwd_tokens_per_s": b_ * t_ / dt,
        "fwd_tokens_per_s": b_ * t_ / dt_f,
        "ns_per_token_fwd_bwd": 1e9 * dt / (b_ * t_),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="1e3,1e4,1e5,1e6,1e7", help="comma-separated table sizes")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch * length)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dim", type=int, default=256, help="model width")
    p.add_argument("--slot-dim", type=int, default=16)
    p.add_argument("--heads", type=int, default=8, help="hash heads per order (orders 2 and 3)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--modes", default="dense,sparse", help="dense, sparse or both")
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    results = []
    print(f"{'table':>10} {'grad':>6} {'fwd+bwd tok/s':>14} {'fwd tok/s':>12} {'ns/token':>9}")
    for s in args.sizes.split(","):
        size = int(float(s))
        for mode in args.modes.split(","):
            r = bench(size, mode == "sparse", args, device)
            results.append(r)
            print(f"{size:>10.0e} {mode:>6} {r['fwd_bwd_tokens_per_s']:>14,.0f} {r['fwd_tokens_per_s']:>12,.0f} {r['ns_per_token_fwd_bwd']:>9,.0f}", flush=True)
    info = {
        "benchmark": "hash_lookup",
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "args": vars(args),
        "results": results,
    }
    out = args.out or f"hash_lookup-{device.type}.json"
    with open(out, "w") as f:
        json.dump(info, f, indent=2)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
