"""The Engram lookup, piece by piece, torch code and fused Triton kernels side by side.

Issue 14's figures, in one run:

- device copy bandwidth (`y.copy_(x)`, bytes read + written per second): the roof;
- each piece below twice on CUDA: the wall time of a call as a caller sees it (Python,
  dispatch, launch, sync) and the device time (`*_device_us`: 50 calls captured in one CUDA
  graph and replayed, so no host dispatch is in the figure; the kernel goals are about this);
- the n-gram hash of all orders and heads (16,384 tokens, orders 2-3 x 8 heads): µs;
- the gather of all heads' rows into the concatenated row vector (262,144 row reads of
  slot 64), forward and backward (scatter-add; `--deterministic` adds the sorted segment
  sum): GB/s moved and the fraction of copy bandwidth;
- one memory block (hash, gather, value/key projections, conv, context gate, residual;
  width 1024, slot 64, 16 heads) forward and forward+backward for table sizes 10^5..10^8
  rows where memory allows (table, its dense gradient and a margin must fit), eager and,
  with `--compile`, under torch.compile; time per token should be flat in table size.
  Forward+backward includes the table's update by its row-wise optimiser
  (`--table-optimizer`, rowwise_adagrad), built as by default: on CUDA the table makes a
  sparse gradient of the rows read and is updated inside the backward (no dense
  table-sized gradient); on a CPU at `step()` from a dense gradient. `--dense-tables` adds
  rows for the dense path (`fused_backward=False`: dense gradient, update at `step()`);
  each row says which path ran (`table_path`).

    python benchmarks/hash_lookup.py --device cuda --compile --deterministic   # the GPU measurement
    OMP_NUM_THREADS=1 python benchmarks/hash_lookup.py --tiny                  # CPU smoke run (seconds)

Kernels: `--kernels torch,triton` (default: both where triton runs on the device; on a CPU
only torch, unless TRITON_INTERPRET=1, which is for correctness, not speed). Prints tables
and writes JSON to benchmarks/results/hash_lookup-<device>[-tiny].json (--out to change).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when a test loads this file
from bench_common import apply_tiny, cuda_kernels, write_result  # noqa: E402

TINY = dict(tokens=256, batch=2, dim=64, slot_dim=16, heads=4, vocab=1000, sizes="1e3,1e4", iters=3, warmup=1, copy_mib=8)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--kernels", default="", help="comma-separated: torch, triton (default: every one that runs here)")
    p.add_argument("--sizes", default="1e5,1e6,1e7,1e8", help="comma-separated table sizes (rows) for the memory block")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (batch * length)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024, help="model width")
    p.add_argument("--slot-dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=8, help="hash heads per order (orders 2 and 3)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="compute dtype (auto: bf16 autocast on cuda, fp32 on cpu)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--copy-mib", type=int, default=1024, help="size of the copy-bandwidth probe")
    p.add_argument("--compile", action="store_true", help="also time the memory block under torch.compile")
    p.add_argument("--deterministic", action="store_true", help="also time the deterministic (sorted segment sum) backward")
    p.add_argument("--sparse", action="store_true", help="also time sparse table gradients (nn.Embedding(sparse=True))")
    p.add_argument("--dense-tables", action="store_true", help="also time the dense path (row-wise optimiser with fused_backward=False)")
    p.add_argument("--table-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "rowwise_adam"],
                   help="the table's optimiser in the memory block's step")
    p.add_argument("--fuse", default="auto",
                   help="comma-separated fuse settings of the block to time (auto: compiled elementwise regions on CUDA; off; compile), "
                        "alternating their order from one table size to the next")
    p.add_argument("--conv-impl", default="auto", choices=["auto", "conv1d", "taps"],
                   help="the block's conv_impl (auto: shifted taps inside compiled code, torch's conv1d eagerly)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS forward+backward steps of each block (torch.profiler) and save its top operations")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke run); explicit flags still win")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    apply_tiny(args, argv, TINY)
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters, warmup) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def device_time(fn, device, reps: int) -> float | None:
    """Device seconds per call, without the host's dispatch: `reps` calls captured in one
    CUDA graph and the graph replayed (median of 5 replays). `timed` measures a call as a
    caller sees it (Python, the operator's dispatch, the launch, then a sync): for a kernel
    of a few µs that is mostly the host. None off CUDA."""
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    torch.cuda.empty_cache()
    return statistics.median(times)


def device_times(pieces: dict, device, reps: int) -> dict:
    """`device_time` of each named piece; a piece that cannot be captured says why."""
    out = {}
    for name, (fn, n) in pieces.items():
        try:
            out[name] = device_time(fn, device, n or reps)
        except Exception as exc:  # noqa: BLE001 - recorded; the wall-clock figures still stand
            out[name] = None
            out[name + "_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return out


def copy_bandwidth(args, device) -> dict:
    n = args.copy_mib * 2**20 // 4
    x = torch.empty(n, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    dt = timed(lambda: y.copy_(x), device, args.iters, args.warmup)
    return {"bytes": 2 * x.numel() * 4, "seconds": dt, "gb_per_s": 2 * x.numel() * 4 / dt / 1e9}


def make_block(size, kernels_choice, args, device, sparse=False, fuse="auto"):
    from engram_llm_hash.hf import _DimsOnly
    from engram_llm_hash.memories import EngramHashConfig, EngramHashMemory

    from engram_core.components import BuildContext

    cfg = EngramHashConfig(memory_size=size, layers=[0], orders=[2, 3], heads_per_order=args.heads, slot_dim=args.slot_dim,
                           sparse=sparse, conv_kernel=4, kernels=kernels_choice, fuse=fuse, conv_impl=args.conv_impl)
    torch.manual_seed(0)
    with device:
        mem = EngramHashMemory(cfg, BuildContext(head=_DimsOnly(args.dim, args.vocab, 1)))
    mem.to(device)
    block = mem.blocks["0"]
    block.track = False  # telemetry has its own line below
    return mem, block


def bench_pieces(kernels_choice, args, device, compute) -> dict:
    """Hash, gather forward, gather backward of one block's table (10^6 rows or the smallest size)."""
    from engram_llm_hash import kernels

    size = min(10**6, max(int(float(s)) for s in args.sizes.split(",")))  # table size does not matter here
    _, block = make_block(size, kernels_choice, args, device)
    h = block.hasher
    t = args.tokens // args.batch
    ids = torch.randint(0, args.vocab, (args.batch, t), generator=torch.Generator().manual_seed(1)).to(device)
    fused = kernels.use_triton(kernels_choice, device)
    hash_window = kernels.hash_window_triton if fused else kernels.hash_window_torch
    hash_s = timed(lambda: hash_window(h, ids, 0, t), device, args.iters, args.warmup)
    rows, _ = hash_window(h, ids, 0, t)
    table = block.table.weight.detach().to(compute).requires_grad_(True)
    if fused:
        gather = lambda: kernels.gather_rows_triton(table, rows, compute)  # noqa: E731
    else:
        gather = lambda: torch.nn.functional.embedding(rows, table).flatten(2)  # noqa: E731
    with torch.no_grad():
        fwd_s = timed(gather, device, args.iters, args.warmup)
    out = gather()
    grad = torch.randn_like(out)

    def backward(deterministic=False):
        if fused:
            return kernels.scatter_rows_triton(grad, rows, table.shape[0], table.dtype, deterministic)
        return torch.autograd.grad(out, table, grad, retain_graph=True)[0]

    def gather_nograd():
        with torch.no_grad():
            return gather()

    bwd_s = timed(backward, device, args.iters, args.warmup)
    reads = rows.numel()
    elem = table.element_size()
    moved = reads * args.slot_dim * elem * 2 + reads * 8  # rows read + vector written + the row indices
    res = {
        "kernels": kernels_choice, "fused": fused, "table_rows": table.shape[0], "row_reads": reads, "dtype": str(compute),
        "hash_us": 1e6 * hash_s, "gather_fwd_us": 1e6 * fwd_s, "gather_fwd_gb_per_s": moved / fwd_s / 1e9,
        "gather_bwd_us": 1e6 * bwd_s,
    }
    if args.deterministic and fused:
        res["gather_bwd_deterministic_us"] = 1e6 * timed(lambda: backward(True), device, args.iters, args.warmup)
    # the Triton pieces as device time (CUDA graph replay): what the kernels cost. Not the
    # torch path: its hash reads the device on the host, which a capture refuses
    if device.type == "cuda" and fused:
        dev = device_times({"hash": (lambda: hash_window(h, ids, 0, t), 50), "gather_fwd": (lambda: gather_nograd(), 50),
                            "gather_bwd": (backward, 10)}, device, 50)
        for name in ("hash", "gather_fwd", "gather_bwd"):
            res[f"{name}_device_us"] = None if dev[name] is None else 1e6 * dev[name]
            if f"{name}_error" in dev:
                res[f"{name}_device_error"] = dev[f"{name}_error"]
        if dev["gather_fwd"]:
            res["gather_fwd_device_gb_per_s"] = moved / dev["gather_fwd"] / 1e9
    return res


def fits(size, args, device, dense_gradient: bool = True) -> bool:
    """Table + its dense gradient (fp32) + the gradient being made, with a margin; without
    a dense gradient (rows, updated in backward), the table and its row-wise state."""
    need = (3.2 if dense_gradient else 1.3) * size * args.slot_dim * 4
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need < 0.8 * free
    return need < 4 * 2**30  # a CPU: stay well below a shared machine's memory


def table_optimizer(block, args, dense: bool):
    """The table's row-wise optimiser (the rest of the block is not stepped: its cost is
    the same on every path), and which path it takes."""
    from engram_core.tables.rowwise import ROWWISE_OPTIMIZERS

    opt = ROWWISE_OPTIMIZERS[args.table_optimizer]([block.table.weight], lr=1e-2, fused_backward=False if dense else "auto")
    gradient = "rows" if getattr(block.table, "row_gradients", False) else "dense"
    return opt, f"{'dense' if dense else 'default'}: {gradient} gradient, update {'in backward' if opt.updates_in_backward else 'at step'}"


def bench_block(size, kernels_choice, compiled, sparse, args, device, amp, dense=False, fuse="auto") -> dict:
    mem, block = make_block(size, kernels_choice, args, device, sparse=sparse, fuse=fuse)
    opt, path = table_optimizer(block, args, dense)
    t = args.tokens // args.batch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, t), generator=g).to(device)
    hidden = torch.randn(args.batch, t, args.dim, generator=g).to(device).requires_grad_(True)
    if compiled:
        torch.compiler.reset()  # each block is a new module: without this, dynamo's recompile limit ends in eager
    fn = torch.compile(block) if compiled else block

    def forward():
        with amp():
            return fn(hidden, ids)

    def step():
        mem.zero_grad(set_to_none=True)  # the new gradient is assigned, not added to a second table-sized one
        opt.zero_grad(set_to_none=True)
        forward().float().pow(2).mean().backward()
        opt.step()  # the table's update (already done inside the backward on the default CUDA path)

    fwd_bwd = timed(step, device, args.iters, args.warmup)
    top = profile_steps(step, device, args.profile) if args.profile else None
    with torch.no_grad():
        fwd = timed(forward, device, args.iters, args.warmup)
    # telemetry on: what recording costs per forward (usage counts + the collision sample)
    block.track = True
    with torch.no_grad():
        fwd_tracked = timed(forward, device, args.iters, args.warmup)
    tokens = args.batch * t
    return {
        "table_size": size, "kernels": kernels_choice, "compiled": compiled, "sparse": sparse, "tokens": tokens,
        "fuse": fuse, "fused_regions": block.fused(device, tokens * args.dim) and not compiled,
        "table_path": path, "table_optimizer": args.table_optimizer, "fwd_ms": 1e3 * fwd, "fwd_bwd_ms": 1e3 * fwd_bwd, "fwd_with_telemetry_ms": 1e3 * fwd_tracked,
        "ns_per_token_fwd_bwd": 1e9 * fwd_bwd / tokens,
        **({"profile_top_ops": top, "profile_steps": args.profile} if top is not None else {}),
    }


def profile_steps(step, device, steps: int, top: int = 15) -> list[dict]:
    """Where a step's time goes: `steps` steps under torch.profiler, the operations with the
    most self time on the device (on the CPU where there is no device), per step; for each
    operator the input shapes of its three largest groups of calls (which call it is)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    events = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:top]
    sites: dict[str, list] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        sites.setdefault(e.key, []).append(e)

    def where(e) -> dict:
        return {"input_shapes": [list(s) for s in e.input_shapes if s], "self_ms_per_step": getattr(e, key) / 1e3 / steps}

    rows = [{"name": e.key, "self_ms_per_step": getattr(e, key) / 1e3 / steps, "calls_per_step": e.count / steps,
             "sites": [where(x) for x in sorted(sites.get(e.key, []), key=lambda x: getattr(x, key), reverse=True)[:3]]}
            for e in events]
    if device.type == "cuda":  # the kernels alone (an operator's row repeats its kernels' time): the step's device time
        kernels = cuda_kernels(averages)
        rows.append({"name": "all kernels (device time of a step)", "self_ms_per_step": sum(e.self_device_time_total for e in kernels) / 1e3 / steps,
                     "calls_per_step": sum(e.count for e in kernels) / steps})
    return rows


def main(argv=None) -> dict:
    import contextlib

    from engram_llm_hash import kernels

    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    compute = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if compute == torch.bfloat16 else contextlib.nullcontext
    runnable = ["torch"] + (["triton"] if kernels.triton_available() and (device.type == "cuda" or kernels.interpreting()) else [])
    chosen = [k for k in args.kernels.split(",") if k] or runnable
    skipped = [k for k in chosen if k not in runnable]
    chosen = [k for k in chosen if k in runnable]
    for k in skipped:
        print(f"kernels={k}: does not run on {device.type} here (triton missing, or a CPU without TRITON_INTERPRET=1); skipped")

    copy = copy_bandwidth(args, device)
    print(f"device copy bandwidth: {copy['gb_per_s']:.1f} GB/s ({device})")
    pieces = [bench_pieces(k, args, device, compute) for k in chosen]
    print(f"{'kernels':>8} {'hash µs':>9} {'gather fwd µs':>14} {'GB/s':>8} {'% copy':>7} {'gather bwd µs':>14}   (wall per call)")
    for r in pieces:
        r["gather_fraction_of_copy"] = r["gather_fwd_gb_per_s"] / copy["gb_per_s"]
        print(f"{r['kernels']:>8} {r['hash_us']:>9.1f} {r['gather_fwd_us']:>14.1f} {r['gather_fwd_gb_per_s']:>8.1f} "
              f"{100 * r['gather_fraction_of_copy']:>6.1f}% {r['gather_bwd_us']:>14.1f}", flush=True)
        if r.get("gather_fwd_device_gb_per_s"):
            r["gather_device_fraction_of_copy"] = r["gather_fwd_device_gb_per_s"] / copy["gb_per_s"]
            fmt = lambda v: f"{v:.1f}" if v is not None else "n/a"  # noqa: E731
            print(f"{r['kernels']:>8} {fmt(r['hash_device_us']):>9} {fmt(r['gather_fwd_device_us']):>14} "
                  f"{r['gather_fwd_device_gb_per_s']:>8.1f} {100 * r['gather_device_fraction_of_copy']:>6.1f}% "
                  f"{fmt(r['gather_bwd_device_us']):>14}   (device time, CUDA graph replay)", flush=True)

    from engram_core.tables.rowwise import in_backward_by_default

    rows_by_default = in_backward_by_default(device)  # the default path makes no dense table gradient
    blocks = []
    print(f"memory block: {args.tokens} tokens, width {args.dim}, slot {args.slot_dim}, {2 * args.heads} heads, {compute}")
    print(f"{'rows':>8} {'kernels':>8} {'mode':>9} {'fwd ms':>8} {'fwd+bwd ms':>11} {'+telemetry ms':>14} {'ns/token':>9}  table path")
    fuses = [f for f in args.fuse.split(",") if f]
    for i, s in enumerate(args.sizes.split(",")):
        size = int(float(s))
        if not fits(size, args, device, dense_gradient=not rows_by_default):
            print(f"{size:>8.0e} skipped: the table{'' if rows_by_default else ' and its gradient'} do not fit")
            continue
        for k in chosen:
            for compiled in [False] + ([True] if args.compile else []):
                variants = [(False, False)] + ([(True, False)] if args.sparse else []) + ([(False, True)] if args.dense_tables else [])
                order = fuses if i % 2 == 0 else fuses[::-1]  # which fuse setting goes first alternates
                for (sparse, dense), fuse in [(v, f) for v in variants for f in order]:
                    if dense and not fits(size, args, device):
                        print(f"{size:>8.0e} {k:>8} dense path skipped: the table and its dense gradient do not fit")
                        continue
                    try:
                        r = bench_block(size, k, compiled, sparse, args, device, amp, dense=dense, fuse=fuse)
                    except Exception as exc:  # noqa: BLE001 - recorded, the other figures still come
                        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                        blocks.append({"table_size": size, "kernels": k, "compiled": compiled, "sparse": sparse, "dense_tables": dense,
                                       "fuse": fuse, "error": msg})
                        print(f"{size:>8.0e} {k:>8} {'compiled' if compiled else 'eager':>9} failed: {msg}", flush=True)
                        continue
                    blocks.append(r)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # the block's table and gradient are gone with its frame
                    mode = ("compiled" if compiled else "eager") + (" sp" if sparse else "") + (" dn" if dense else "") + \
                        (" fused" if r["fused_regions"] else "")
                    print(f"{size:>8.0e} {k:>8} {mode:>9} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>11.3f} "
                          f"{r['fwd_with_telemetry_ms']:>14.3f} {r['ns_per_token_fwd_bwd']:>9.1f}  {r['table_path']}", flush=True)
                    for op in r.get("profile_top_ops", []):
                        print(f"{'':>10}{op['self_ms_per_step']:>8.3f} ms {op['calls_per_step']:>6.1f}×  {op['name'][:90]}")
    import transformers

    info = {
        "benchmark": "hash_lookup",
        "command": "python benchmarks/hash_lookup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "kernels_skipped": skipped,
        "copy": copy, "pieces": pieces, "blocks": blocks,
    }
    write_result(info, args.out, f"hash_lookup-{device.type}{'-tiny' if args.tiny else ''}")
    return info


if __name__ == "__main__":
    main()
