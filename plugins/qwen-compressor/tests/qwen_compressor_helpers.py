"""Small shared builders for the qwen-compressor tests (tiny configs, CPU, seconds)."""

from __future__ import annotations

import torch
from engram_qwen_compressor.data import DigitKVConfig, DigitKVDataset
from engram_qwen_compressor.memory import MemEncoder, MemEncoderConfig
from engram_qwen_compressor.reader import CompressorReader, ReaderConfig

from engram_core.components import BuildContext, Model

_DATA_CACHE: dict = {}


def small_data(tmp_path=None, **kw) -> DigitKVDataset:
    cfg = DigitKVConfig(**{"n_train": 64, "n_eval": 32, "budgets": [64], **kw})
    key = (repr(cfg), str(tmp_path))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = DigitKVDataset(cfg, BuildContext(cache_dir=tmp_path) if tmp_path else None)
    return _DATA_CACHE[key]


def small_model(ds=None, memory=True, reader_kw=None, memory_kw=None, seed=0):
    ds = ds or small_data()
    torch.manual_seed(seed)
    build = BuildContext(spec=ds.spec, dataset=ds)
    head = CompressorReader(ReaderConfig(**{"dim": 32, "n_layers": 1, "n_heads": 2, **(reader_kw or {})}), build)
    build.head = head
    mem = MemEncoder(MemEncoderConfig(**{"dim": 32, "n_heads": 2, "n_cross_layers": 1, **(memory_kw or {})}), build) if memory else None
    return Model(head, mem, "context" if mem is not None else None), build


def batch(ds, n=4, seed=0, budget=None):
    return ds.sample("train", n, torch.Generator().manual_seed(seed), budget=budget)
