"""Pretrain the qwen-compressor reader (the recipes' `pretrain` fit action, same cache) and
print its accuracy per mode and budget as JSON.

    OMP_NUM_THREADS=1 python benchmarks/qwen_compressor_reader.py                 # the recipes' reader
    OMP_NUM_THREADS=1 python benchmarks/qwen_compressor_reader.py --token-shift 0 # no token shift

Uses the engram cache ($ENGRAM_CACHE or ~/.cache/engram): a reader the recipes already
trained is loaded only when everything that determines its weights agrees (configs, options,
generator state and initial weights, code); otherwise it is trained again.
"""

import argparse
import json
import time

import torch
from engram_qwen_compressor.data import DigitKVConfig, DigitKVDataset
from engram_qwen_compressor.metrics import DigitAccuracy, DigitAccuracyConfig
from engram_qwen_compressor.reader import CompressorReader, ReaderConfig

from engram_core.components import BuildContext, FitContext, Model, default_cache_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--token-shift", type=int, default=5)
    p.add_argument("--shift-mode", default="fixed")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--out", default="", help="also write the JSON here")
    a = p.parse_args()
    torch.manual_seed(0)  # what engram-run does for run.seed = 0
    cache = default_cache_dir()
    ds = DigitKVDataset(DigitKVConfig(), BuildContext(cache_dir=cache))
    build = BuildContext(spec=ds.spec, dataset=ds, cache_dir=cache)
    head = CompressorReader(ReaderConfig(dim=a.dim, n_heads=a.n_heads, n_layers=a.n_layers, token_shift=a.token_shift,
                                         shift_mode=a.shift_mode), build)
    # the recipes' fit stage 0 with run.seed 0 draws from Generator(seed * 1000 + 0)
    ctx = FitContext(Model(head), ds, torch.device("cpu"), torch.Generator().manual_seed(0), 32, "train", None, 0)
    t = time.perf_counter()
    head.pretrain(ctx, steps=a.steps, lr=a.lr, batch_size=32, modes=["summary"], budgets=[16, 32, 64, 96, 128])
    train_s = time.perf_counter() - t
    metric = DigitAccuracy(DigitAccuracyConfig(modes=["summary", "discard", "oracle_kv", "oracle_digit"],
                                               budgets=[16, 32, 64, 96, 128], max_examples=a.examples), build)
    metric.reset()
    model = Model(head)
    model.eval()
    with torch.no_grad():
        for b in metric.batches(ds, "eval", 128):
            metric.update(model, b)
    result = {"config": vars(a), "pretrain_s": round(train_s, 1), **{k: round(v, 4) for k, v in metric.compute().items()}}
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
