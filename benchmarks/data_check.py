"""What checking a `data.path` array costs at validate time (issue 33).

`synthetic_dynamics` with `data.path` now reads every value of the .npy file (memory-mapped,
in chunks of ~4M values) to find NaN/inf before training. This times that scan against the
header-only read it replaced, for a float32 and a float64 file of the given size.

    python benchmarks/data_check.py --mb 256            # prints and writes benchmarks/results/data_check.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_result  # noqa: E402

from engram_core.builtin.dynamics import _check_array  # noqa: E402


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256, help="size of each test file in MiB")
    p.add_argument("--repeats", type=int, default=3, help="best of this many (the file is in the page cache after the first)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/data_check.json)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float32", "float64"):
            n = args.mb * 2**20 // np.dtype(dtype).itemsize
            dim, frames = 64, 256
            seqs = max(2, n // (dim * frames))
            path = Path(tmp) / f"traj_{dtype}.npy"
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(seqs, frames, dim))
            arr[:] = np.random.default_rng(0).standard_normal((1, frames, dim)).astype(dtype)  # broadcast: fast to write
            arr.flush()
            del arr
            header = timed(lambda path=path: np.load(path, mmap_mode="r", allow_pickle=False).shape, args.repeats)
            scan = timed(lambda path=path: _check_array(str(path), np.load(path, mmap_mode="r", allow_pickle=False)), args.repeats)
            size = path.stat().st_size
            rows.append({"dtype": dtype, "shape": [seqs, frames, dim], "bytes": size, "header_s": header, "scan_s": scan,
                         "scan_gb_per_s": size / scan / 1e9})
            print(f"{dtype}: {size / 2**20:.0f} MiB, header {header * 1e3:.2f} ms, full check {scan:.3f} s ({size / scan / 1e9:.2f} GB/s)")
    write_result({"rows": rows, "note": "best of --repeats; the file is in the page cache after the first read"}, args.out, "data_check")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
