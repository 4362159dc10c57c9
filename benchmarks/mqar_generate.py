"""How long the `mqar` data set takes to build: generation piece by piece, and the cache.

Issue 32: at Zoology's first setting (100k sequences, vocabulary 8,192, length 64, 4 pairs)
`generate_mqar` took 20 s on an idle 2-core machine, almost all of it a full `argsort` of
4,095 random numbers per sequence to pick 4 distinct keys. This measures, at that setting
and at Zoology's other (length, pairs) settings:

- `generate_mqar` for the training split, and its parts: the distinct keys (Floyd's
  algorithm), the query slots (Gumbel top-k), the rest (ids, labels);
- the whole data set (train + 3k eval) built through the cache: a miss (generate, pack,
  write) and a hit (read, unpack), in a fresh temporary cache folder;
- with `--argsort`, the key picking it replaced (`rand(n, V/2 - 1).argsort()[:, :N]`), once
  (its cost depends on the key range, the same at every setting).

    OMP_NUM_THREADS=1 python benchmarks/mqar_generate.py             # about a second a setting
    OMP_NUM_THREADS=1 python benchmarks/mqar_generate.py --argsort   # plus the old sort (tens of seconds)

Prints a table and writes benchmarks/results/mqar_generate.json (--out to change).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when a test loads this file
from bench_common import write_result  # noqa: E402

from engram_core.builtin.mqar import MQARConfig, MQARDataset, distinct_keys, generate_mqar, query_slots  # noqa: E402
from engram_core.components import BuildContext  # noqa: E402

SETTINGS = [(64, 4), (128, 8), (256, 16), (512, 64)]  # Zoology's Figure 2 (length, pairs)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="training sequences")
    p.add_argument("--n-eval", type=int, default=3_000, help="evaluation sequences")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--settings", default=",".join(f"{l}x{n}" for l, n in SETTINGS), help="LENGTHxPAIRS,...")
    p.add_argument("--spacing", default="random", choices=["random", "power", "packed"])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    p.add_argument("--argsort", action="store_true", help="also time the argsort key picking once (slow)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/mqar_generate.json)")
    return p.parse_args(argv)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(args, length: int, pairs: int) -> dict:
    cfg = MQARConfig(n_pairs=pairs, seq_len=length, vocab_size=args.vocab, query_spacing=args.spacing,
                     n_train=args.n, n_eval=args.n_eval)
    n, n_keys, slots = args.n, args.vocab // 2 - 1, (length - 2 * pairs) // 2
    row = {"seq_len": length, "n_pairs": pairs, "n": n, "vocab_size": args.vocab, "spacing": args.spacing}
    row["generate_s"] = timed(lambda: generate_mqar(cfg, n, 1), args.repeats)
    row["keys_s"] = timed(lambda: distinct_keys(n, pairs, n_keys, torch.Generator().manual_seed(1)), args.repeats)
    row["query_slots_s"] = timed(lambda: query_slots(cfg, n, slots, torch.Generator().manual_seed(1)), args.repeats)
    with tempfile.TemporaryDirectory() as cache_dir, contextlib.redirect_stdout(io.StringIO()):
        build = BuildContext(cache_dir=Path(cache_dir))
        row["dataset_cache_miss_s"] = timed(lambda: MQARDataset(cfg, build), 1)
        row["dataset_cache_hit_s"] = timed(lambda: MQARDataset(cfg, build), args.repeats)
        row["cache_bytes"] = sum(f.stat().st_size for f in Path(cache_dir).rglob("*.pt"))
    return row


def argsort_keys(args, pairs: int) -> float:
    """The key picking generate_mqar used before (its cost depends on the key range, not on the setting)."""
    g = torch.Generator().manual_seed(1)
    return timed(lambda: torch.rand(args.n, args.vocab // 2 - 1, generator=g).argsort(-1)[:, :pairs], 1)


def main(argv=None):
    args = parse(argv)
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings.split(",")]
    rows = []
    print(f"{'length':>6} {'pairs':>5} {'generate s':>10} {'keys s':>8} {'slots s':>8} {'miss s':>8} {'hit s':>8}")
    for length, pairs in settings:
        r = measure(args, length, pairs)
        rows.append(r)
        print(f"{length:>6} {pairs:>5} {r['generate_s']:>10.3f} {r['keys_s']:>8.3f} {r['query_slots_s']:>8.3f} "
              f"{r['dataset_cache_miss_s']:>8.3f} {r['dataset_cache_hit_s']:>8.3f}")
    before = argsort_keys(args, settings[0][1]) if args.argsort else None
    if before is not None:
        print(f"the argsort key picking it replaced: {before:.2f} s ({args.n} sequences, {args.vocab // 2 - 1} keys)")
    info = {
        "benchmark": "mqar_generate",
        "what": "seconds to generate mqar's training split (and its parts) and to build the data set through the cache",
        "host": {"cpus": os.cpu_count(), "machine": platform.machine(), "threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "repeats": args.repeats,
        "load_average": list(os.getloadavg()),
        "rows": rows,
        "argsort_keys_s": before,
    }
    write_result(info, args.out, "mqar_generate")
    return info


if __name__ == "__main__":
    main()
