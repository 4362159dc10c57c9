"""Soft top-k retrieval, forward + backward: `engram_core.nn.soft_topk` against the dense
formulation it replaced (every query's squared distance to every key kept for the backward,
the top k's gradient scattered back into that (N, M) matrix).

The shape is the memory zoo's `hybrid_hash_content` row at batch 128 on a CPU (or 512 with
`--batch 512`): 64 positions a sequence, slot 16, 4,096 table rows, k = 8. The two are timed
in alternating order, `--repeats` times; each figure is the median ms of a fwd+bwd.

    python benchmarks/soft_topk.py [--device cpu|cuda] [--batch 128] [--repeats 4]

Prints and saves JSON to benchmarks/results/soft_topk-<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import write_result  # noqa: E402


def dense_soft_topk(query, keys, values, k: int, tau: float):
    """The formulation before: d2 of every pair, differentiable, then top-k of it."""
    flat = query.reshape(-1, query.shape[-1])
    d2 = (flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ keys.T + keys.pow(2).sum(-1)).clamp_min(0)
    neg, idx = torch.topk(-d2, k, dim=-1)
    w = torch.softmax(neg / tau, dim=-1)
    return (w.unsqueeze(-1) * values[idx]).sum(-2).reshape(query.shape[:-1] + values.shape[1:]), w


def main(argv=None) -> int:
    from engram_core.nn import soft_topk

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--slot", type=int, default=16)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    q = torch.randn(args.batch, args.seq, args.slot, device=dev, requires_grad=True)
    table = torch.randn(args.rows, args.slot, device=dev, requires_grad=True)
    impls = {"soft_topk": lambda: soft_topk(q, table, table, args.k, 1.0)[0],
             "dense": lambda: dense_soft_topk(q, table, table, args.k, 1.0)[0]}
    for fn in impls.values():  # warm-up
        fn().sum().backward()
    times: dict[str, list[float]] = {name: [] for name in impls}
    for r in range(args.repeats):
        for name in (list(impls) if r % 2 == 0 else list(impls)[::-1]):
            sync()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                impls[name]().sum().backward()
            sync()
            times[name].append(1e3 * (time.perf_counter() - t0) / args.iters)
    med = {name: statistics.median(v) for name, v in times.items()}
    info = {"benchmark": "soft_topk", "command": "python benchmarks/soft_topk.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "config": vars(args), "ms_fwd_bwd": times, "median_ms": med,
            "speedup": med["dense"] / med["soft_topk"]}
    for name, v in med.items():
        print(f"{name:>10}: {v:8.1f} ms fwd+bwd (median of {args.repeats}: {', '.join(f'{x:.1f}' for x in times[name])})")
    print(f"soft_topk is {info['speedup']:.1f}x the dense formulation's speed")
    write_result(info, args.out, f"soft_topk-{dev.type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
