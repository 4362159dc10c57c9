"""Row-sharded Engram table (memory.placement = "sharded"): communication per step and step time
with N ranks (gloo on the CPU: N simulated shards on one machine) against the unsharded table.

Each configuration trains one engram_hash memory block data-parallel, as the engine does: the
global batch of `--tokens` tokens is split over the N ranks, every rank runs forward, backward
(its table rows' gradients come back by all-to-all) and an Adam step; the replicated
projections are all-reduced like DDP would. N = 1 with placement "device" is the baseline.

    OMP_NUM_THREADS=1 python benchmarks/sharded_lookup.py                  # N = 1, 2, 4 on the CPU
    python benchmarks/sharded_lookup.py --nproc 1,2 --device cuda          # NCCL, one GPU per rank

Bytes are counted from the lookups themselves (ids sent to each owner, the rows coming back
and their gradients going out) and compared with the formula of docs/plugins/llm-hash.md:
per rank and table, 8*U + 2*U*D*b (+ 24*N header bytes), U the rank's unique rows.
Prints a table and writes JSON (--out, default benchmarks/results/sharded_lookup-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args) -> None:
    import torch.distributed as torch_dist
    from engram_llm_hash.hf import _DimsOnly
    from engram_llm_hash.memories import EngramHashConfig, EngramHashMemory

    from engram_core.components import BuildContext
    from engram_core.tables.sharded_rows import sharded_tables

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            device = torch.device("cuda", rank % torch.cuda.device_count())
        torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = EngramHashConfig(memory_size=args.rows, layers=[0], orders=[2, 3], heads_per_order=args.heads, slot_dim=args.slot_dim, placement=args.placement, conv_kernel=4)
    torch.manual_seed(0)
    mem = EngramHashMemory(cfg, BuildContext(head=_DimsOnly(args.dim, args.vocab, 1))).to(device)
    for b in mem.blocks.values():
        b.track = False
    opt = torch.optim.Adam(mem.parameters(), lr=1e-3)
    tables = [t for _, t in sharded_tables(mem)]
    replicated = [p for p in mem.parameters() if all(p is not t.weight for t in tables)]
    seq = args.seq
    batch = args.tokens // seq // world
    g = torch.Generator().manual_seed(1)
    traffic = []

    def step(i):
        ids = torch.randint(0, args.vocab, (batch * world, seq), generator=g)[rank * batch : (rank + 1) * batch].to(device)
        hidden = torch.randn(batch, seq, args.dim, generator=g).to(device)
        opt.zero_grad(set_to_none=True)
        out = mem.apply_layer(0, hidden, ids)
        out.float().pow(2).mean().backward()
        if world > 1:
            for p in replicated:  # what DDP does for the replicated parameters
                if p.grad is not None:
                    torch_dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
        for t in tables:
            sent = sum(t.last_send_counts)
            to_peers = sent - t.last_send_counts[rank]
            traffic.append({"unique_rows": t.last_unique, "ids_sent": sent, "ids_to_peers": to_peers})

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if world > 1:
            torch_dist.barrier()

    for i in range(args.warmup):
        step(i)
    traffic.clear()
    sync()
    t0 = time.perf_counter()
    for i in range(args.iters):
        step(i)
    sync()
    dt = (time.perf_counter() - t0) / args.iters
    elem = tables[0].weight.element_size() if tables else 4
    d = args.slot_dim
    mean = lambda key: sum(x[key] for x in traffic) / max(len(traffic), 1)  # noqa: E731
    u = mean("unique_rows")
    measured = mean("ids_sent") * 8 + 2 * mean("ids_sent") * d * elem + (24 * world if tables else 0)
    mine = {
        "rank": rank,
        "step_ms": dt * 1000,
        "unique_rows_per_step": u,
        "bytes_sent_per_step": measured if tables else 0.0,
        "bytes_to_other_ranks_per_step": (mean("ids_to_peers") * (8 + 2 * d * elem)) if tables else 0.0,
        "formula_bytes": (8 * u + 2 * u * d * elem + 24 * world) if tables else 0.0,
    }
    allr = [mine]
    if world > 1:
        allr = [None] * world
        torch_dist.all_gather_object(allr, mine)
        from engram_core.run.distributed import leave_process_group

        del tables
        leave_process_group()  # gc, barrier, leave (its docstring says why)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(allr))


def launch(n: int, placement: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        common = [__file__, "--worker", "--worker-out", str(out), "--placement", placement, "--device", args.device]
        common += [f"--{k}={getattr(args, k)}" for k in ("rows", "dim", "vocab", "heads", "slot_dim", "tokens", "seq", "iters", "warmup")]
        cmd = [sys.executable, *common] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *common]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.exit(f"error: {n} rank(s), placement {placement}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", default="1,2,4", help="rank counts of the sharded runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=200_000, help="memory_size (rows of the table, over all heads)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--heads", type=int, default=4, help="hash heads per order (orders 2 and 3)")
    p.add_argument("--slot_dim", type=int, default=16)
    p.add_argument("--tokens", type=int, default=4096, help="global tokens per step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="launches of each configuration (mean and sd of their step times)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--placement", default="sharded", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    load_before = os.getloadavg()
    configs = [(1, "device")] + [(int(x), "sharded") for x in args.nproc.split(",")]
    rows = [{"nproc": n, "placement": pl, "launches": []} for n, pl in configs]
    for _ in range(args.repeats):  # interleaved, so a change of the machine's load hits every configuration
        for row in rows:
            row["launches"].append(launch(row["nproc"], row["placement"], args))
    for row in rows:
        times = [max(x["step_ms"] for x in ranks) for ranks in row["launches"]]  # the slowest rank sets the step
        row["step_ms_each"] = times
        row["step_ms"] = statistics.mean(times)
        row["step_ms_sd"] = statistics.stdev(times) if len(times) > 1 else 0.0
    base = rows[0]["step_ms"]
    print(f"engram_hash memory, {args.rows} rows x {args.slot_dim}, {args.tokens} tokens/step global, {args.device}, {args.repeats} launches each")
    print(f"{'ranks':>5} {'placement':>9} {'step ms':>15} {'vs device':>9} {'unique/rank':>11} {'KB sent/rank':>12} {'KB to peers':>11} {'formula KB':>10}")
    for r in rows:
        ranks = r["launches"][0]
        avg = lambda k, ranks=ranks: sum(x[k] for x in ranks) / len(ranks)  # noqa: E731
        r["unique_rows_per_rank"] = avg("unique_rows_per_step")
        r["bytes_sent_per_rank"] = avg("bytes_sent_per_step")
        r["bytes_to_other_ranks_per_rank"] = avg("bytes_to_other_ranks_per_step")
        r["formula_bytes_per_rank"] = avg("formula_bytes")
        step = f"{r['step_ms']:.1f} ± {r['step_ms_sd']:.1f}"
        print(f"{r['nproc']:>5} {r['placement']:>9} {step:>15} {r['step_ms'] / base:>8.2f}x {r['unique_rows_per_rank']:>11.0f} "
              f"{r['bytes_sent_per_rank'] / 1e3:>12.1f} {r['bytes_to_other_ranks_per_rank'] / 1e3:>11.1f} {r['formula_bytes_per_rank'] / 1e3:>10.1f}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip())
    result = {
        "benchmark": "sharded_lookup",
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out", "placement", "out")},
        "rows": rows,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                    "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"},
        "torch": torch.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "command": " ".join(["python", "benchmarks/sharded_lookup.py", *sys.argv[1:]]),
        "note": "step_ms: mean (sd) over launches of the slowest rank's mean step over iters; N ranks on one machine share its cores (gloo over loopback), "
                "so on a small CPU the time measures contention as much as the method; bytes are exact",
    }
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"sharded_lookup-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
