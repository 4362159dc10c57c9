"""The pretrained reader's cache: reused only when everything that determines its weights agrees."""

import json
from pathlib import Path

import pytest
import torch
from engram_qwen_compressor import reader as reader_mod
from engram_qwen_compressor.data import DigitKVConfig, DigitKVDataset
from engram_qwen_compressor.reader import CompressorReader, ReaderConfig

from engram_core.components import BuildContext, FitContext
from engram_core.testing.cli import run_cli

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "budget_sweep.toml"
SHRINK = [
    "data.n_train=48", "data.n_eval=8",
    "stages.0.options={steps = 3, lr = 1e-3, batch_size = 4, modes = [\"summary\"], budgets = [64]}",
    "stages.1.steps=2", "stages.1.batch_size=4", "stages.1.eval_every=0",
    "metrics.0.max_examples=8", "metrics.1.max_examples=8",
]


def run(tmp_path, *extra):
    r = run_cli(RECIPE, *SHRINK, *extra, "--out", tmp_path / "runs",  # not --quiet: it hides the cache lines
                plugins="qwen-compressor", env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r


def reader_lines(r):
    return [line for line in r.stdout.splitlines() if line.startswith("cache ") and "qwen-compressor/reader" in line]


def readers(tmp_path):
    return sorted((tmp_path / "cache" / "qwen-compressor").glob("reader-*.pt"))


def finals(tmp_path):
    return [json.loads(p.read_text())["final"] for p in sorted((tmp_path / "runs").rglob("summary.json"),
                                                                key=lambda p: p.stat().st_mtime)]


def test_same_recipe_twice_hits_and_gives_the_same_metrics(tmp_path):
    first = run(tmp_path)
    assert [line.split()[1] for line in reader_lines(first)] == ["miss"]
    second = run(tmp_path)
    assert [line.split()[1] for line in reader_lines(second)] == ["hit"]
    assert len(readers(tmp_path)) == 1
    a, b = finals(tmp_path)
    assert a == b
    meta = json.loads(Path(str(readers(tmp_path)[0]) + ".meta.json").read_text())
    assert meta["config"]["pretrain"]["steps"] == 3 and meta["config"]["reader"]["dim"] == 64
    assert meta["config"]["data"]["n_train"] == 48
    assert {"init_weights", "generator_state", "data_key"} <= set(meta["inputs"])


@pytest.mark.parametrize("change", [
    "stages.0.options={steps = 3, lr = 2e-3, batch_size = 4, modes = [\"summary\"], budgets = [64]}",  # pretraining
    "run.seed=1",  # seed: another generator and another initialisation
    "data.seed=1",  # other episodes
    "head.token_shift=3",  # reader config
    "head.lora_rank=2",  # not used while pretraining, but another recipe's setting
])
def test_a_different_setting_misses(tmp_path, change):
    run(tmp_path)
    r = run(tmp_path, change)
    assert [line.split()[1] for line in reader_lines(r)] == ["miss"]
    assert len(readers(tmp_path)) == 2


def test_a_code_version_bump_misses(tmp_path, monkeypatch):
    run(tmp_path)
    monkeypatch.setattr(reader_mod, "READER_VERSION", reader_mod.READER_VERSION + 1)
    r = run(tmp_path)
    assert [line.split()[1] for line in reader_lines(r)] == ["miss"]


def _entry(tmp_path, init_seed, gen_seed=7, advance=0):
    ds = DigitKVDataset(DigitKVConfig(n_train=16, n_eval=4), BuildContext(cache_dir=tmp_path))
    torch.manual_seed(init_seed)
    head = CompressorReader(ReaderConfig(), BuildContext(spec=ds.spec, cache_dir=tmp_path))
    g = torch.Generator().manual_seed(gen_seed)
    torch.rand(advance, generator=g)
    ctx = FitContext(None, ds, torch.device("cpu"), g, 4, "train", None, 0)
    return head.pretrain_cache_entry(ctx, {"steps": 1})


def test_key_covers_the_initialisation_and_the_generator_state(tmp_path):
    base = _entry(tmp_path, 0).key
    assert _entry(tmp_path, 0).key == base
    assert _entry(tmp_path, 1).key != base  # same configs, other initial weights
    assert _entry(tmp_path, 0, advance=1).key != base  # same initial seed, generator already used
    assert _entry(tmp_path, 0, gen_seed=8).key != base
