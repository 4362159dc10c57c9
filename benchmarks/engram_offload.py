"""Engram tables in host memory (`memory.placement = "host"`): the 0.5B-LM training step with
the tables on the host against the same step with them on the device.

The Qwen2-shaped model of benchmarks/engram_in_lm.py (random weights, built from its config:
hidden 896, 24 layers, 14 heads, 2 KV heads, vocabulary 151,936, ~494M parameters), batch
4 × 2048, bf16 autocast, fused AdamW for the model. Engram after layers 1 and 12, slot 64,
orders 2-3 × 8 heads; by default 2 × 10⁸ rows per layer (4 × 10⁸ rows, bf16 ≈ 51 GB), the
tables trained by row-wise Adagrad (one float of state per row) in every part:

- `base`: the model alone;
- `device`: tables on the GPU (`sparse=True`: a dense 51 GB gradient would not fit);
- `host`: tables in pinned host memory; each step draws the next batch first and calls
  `model.engram.prefetch(next_ids)`, as the engine does, so its rows move while this step
  runs;
- `host_no_prefetch`: the same without prefetch (every row fetched when the forward asks):
  what prefetch buys.

Each step draws fresh random ids (almost every row read is new: the hardest case for a
cache). Reported: step time (mean ± sd), each part against `base` and `host` against
`device`, the prefetch hit rate, rows and bytes moved between host and device per step, and
where the host table's thread time goes (ms per step: prefetch calls, waits for copies,
synchronous fetches of missed rows, optimiser update and write-back).

    PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \\
        python benchmarks/engram_offload.py --device cuda             # the measurement (one H200)
    OMP_NUM_THREADS=1 python benchmarks/engram_offload.py --tiny      # CPU smoke run (seconds)

The allocator setting pins the 51 GB table at its own size (the default pinned allocator
rounds up to a power of two). Prints a table and writes JSON to
benchmarks/results/engram_offload-<device>.json (--out to change).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_common, also when a test loads this file
from bench_common import add_lm_args, apply_tiny, write_result  # noqa: E402

PARTS = ("base", "device", "host", "host_no_prefetch")
TINY = dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=512, batch=2, seq=64, engram_layers=[1, 2],
            memory_size=5000, slot_dim=8, heads_per_order=2, steps=3, warmup=1, table_dtype="fp32")


def _lm_bench():
    """benchmarks/engram_in_lm.py: the same model builder, so both measure one model."""
    spec = importlib.util.spec_from_file_location("engram_in_lm", HERE / "engram_in_lm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_lm_args(p, memory_size=200_000_000, precisions=("autocast", "fp32"), precision_help="autocast: fp32 weights, bf16 autocast")
    p.add_argument("--table-dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of the table rows (both placements)")
    p.add_argument("--table-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "rowwise_adam"])
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--tiny", action="store_true", help="a tiny model and table (a CPU smoke run); explicit flags still win")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engram_offload-<device>.json)")
    args = p.parse_args(argv)
    apply_tiny(args, argv, TINY)
    return args


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def attach(model, args, placement: str, device):
    """Engram on `model`, its tables made where they live and in their dtype (a 4 × 10⁸-row
    table never exists as a float32 copy first), the memory's other weights in the model's."""
    from engram_llm_hash.hf import HFInjector, _DimsOnly, decoder_layers, engram_config
    from engram_llm_hash.memories import EngramHashMemory

    from engram_core.components import BuildContext

    cfg = engram_config(args.memory_size, args.engram_layers, "context", slot_dim=args.slot_dim, heads_per_order=args.heads_per_order,
                        sparse=placement == "device", placement="device" if placement == "device" else "host")
    conf = model.config
    dims = _DimsOnly(int(conf.hidden_size), int(conf.vocab_size), len(decoder_layers(model)))
    table_dtype = torch.bfloat16 if args.table_dtype == "bf16" else torch.float32
    model_dtype = next(model.parameters()).dtype
    with torch.device(device), default_dtype(table_dtype):
        memory = EngramHashMemory(cfg, BuildContext(head=dims))
    for block in memory.blocks.values():
        for name, p in block.named_parameters():
            if not name.startswith("table."):
                p.data = p.data.to(model_dtype)
        block.hasher.to(device)  # its index tables are built on the host (also under a meta build); add_engram's .to() moves them
    model.add_module("engram", memory)
    HFInjector(model)
    return memory


def detach(model):
    model._engram_injector.remove()
    del model.engram
    gc.collect()


def optimizers(model, args, fused_ok: bool):
    from engram_core.tables.rowwise import RowwiseAdagrad, RowwiseAdam

    mem = getattr(model, "engram", None)
    tables = [b.table.weight for b in mem.blocks.values()] if mem is not None else []
    ids = {id(p) for p in tables}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    try:
        opts = [torch.optim.AdamW(rest, lr=args.lr, fused=fused_ok)]
    except (RuntimeError, TypeError):
        opts = [torch.optim.AdamW(rest, lr=args.lr)]
    if tables:
        cls = RowwiseAdagrad if args.table_optimizer == "rowwise_adagrad" else RowwiseAdam
        opts.append(cls(tables, lr=args.lr * 5))  # the tables at 5x lr, as engram_param_groups
    return opts


def time_part(model, args, device, prefetch: bool, sync) -> dict:
    opts = optimizers(model, args, fused_ok=device.type == "cuda")
    mem = getattr(model, "engram", None)
    gen = torch.Generator().manual_seed(1)
    draw = lambda: torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen)  # noqa: E731
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "autocast" else contextlib.nullcontext()
    model.train()
    nxt = draw()
    if prefetch and mem is not None:
        mem.prefetch(nxt)
    times, losses = [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup and mem is not None:
            mem.stats()  # telemetry of the timed steps only
        sync()
        t = time.perf_counter()
        ids, nxt = nxt, draw()
        if prefetch and mem is not None:
            mem.prefetch(nxt)  # the next step's rows move while this one runs
        ids = ids.to(device, non_blocking=True)
        with amp:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # no KV cache in training
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        sync()
        if i >= args.warmup:
            times.append(1000 * (time.perf_counter() - t))
            losses.append(float(loss.detach()))
    table = {}
    if mem is not None:
        for k, v in mem.stats().items():
            if any(k.startswith(p) for p in ("prefetch_hit_rate", "host_", "sync_fetches")):
                table[k] = v
    del opts
    out = {
        "step_ms_mean": statistics.mean(times),
        "step_ms_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
        "step_ms": times,
        "tokens_per_s": args.batch * args.seq / (statistics.mean(times) / 1000),
        "last_loss": losses[-1],
        "table": table,
    }
    if device.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out["max_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main(argv=None) -> dict:
    lm = _lm_bench()
    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    args.seq_len = args.seq
    lm_args = argparse.Namespace(**{**vars(args), "precision": "fp32"})  # the builder's fp32 weights; autocast is applied here
    model = lm.build(lm_args, device)
    n_params = sum(p.numel() for p in model.parameters())
    sync = lambda: lm.sync(device)  # noqa: E731
    rows = args.memory_size * len(args.engram_layers)
    row_bytes = args.slot_dim * (2 if args.table_dtype == "bf16" else 4)
    print(f"Qwen2-shaped model: {n_params / 1e6:.1f}M parameters; batch {args.batch}x{args.seq}, {args.precision}, device {device}; "
          f"Engram after layers {args.engram_layers}: {rows:.3g} rows x {args.slot_dim} {args.table_dtype} "
          f"({rows * row_bytes / 1e9:.1f} GB), tables by {args.table_optimizer}", flush=True)
    parts = {}
    for part in args.parts:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time.perf_counter()
        if part != "base":
            attach(model, args, "device" if part == "device" else "host", device)
        built = time.perf_counter() - t
        parts[part] = time_part(model, args, device, prefetch=part == "host", sync=sync)
        parts[part]["build_s"] = built
        r = parts[part]
        extra = ""
        hit = [v for k, v in r["table"].items() if k.startswith("prefetch_hit_rate")]
        moved = sum(v for k, v in r["table"].items() if k.startswith("host_bytes_per_step"))
        if hit:
            extra = f"; prefetch hit rate {min(hit):.3f}, {moved / 1e6:.1f} MB host<->device per step"
        print(f"  {part:17s} {r['step_ms_mean']:8.2f} ± {r['step_ms_sd']:.2f} ms/step (built in {built:.1f} s){extra}", flush=True)
        split = {}
        for k, v in r["table"].items():
            if k.endswith("_ms_per_step"):
                name = k[len("host_") :].split("_ms_per_step")[0]
                split[name] = split.get(name, 0.0) + v
        if split:
            print("  " + " " * 17 + " this thread, ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()), flush=True)
        if part != "base":
            detach(model)

    def overhead(a, b):
        if a in parts and b in parts:
            return parts[a]["step_ms_mean"] / parts[b]["step_ms_mean"] - 1
        return None

    import transformers

    info = {
        "benchmark": "engram_offload",
        "command": "python benchmarks/engram_offload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "seq_len")},
        "model_params": n_params,
        "table_rows": rows,
        "table_gb": rows * row_bytes / 1e9,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "parts": parts,
        "overhead": {
            "device_vs_base": overhead("device", "base"),
            "host_vs_base": overhead("host", "base"),
            "host_vs_device": overhead("host", "device"),
            "host_no_prefetch_vs_device": overhead("host_no_prefetch", "device"),
        },
    }
    for k, v in info["overhead"].items():
        if v is not None:
            print(f"  {k}: {100 * v:+.1f} %")
    write_result(info, args.out, f"engram_offload-{device.type}{'-tiny' if args.tiny else ''}")
    return info


if __name__ == "__main__":
    main()
