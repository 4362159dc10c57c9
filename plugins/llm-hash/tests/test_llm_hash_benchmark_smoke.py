"""benchmarks/engram_in_lm.py runs end to end at a tiny size (its figures are not asserted)."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "engram_in_lm.py"


def test_engram_in_lm_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("engram_in_lm", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "b.json"
    info = bench.main(["--tiny", "--device", "cpu", "--precision", "fp32", "--decode-dtype", "fp32", "--steps", "2", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["config"]["engram_layers"] == [1, 2] and saved["memory_params"] > 0
    for part in ("without_engram", "with_engram"):
        assert saved["train"][part]["step_ms_mean"] > 0 and saved["decode"][part]["tokens_per_s"] > 0
        assert saved["decode"][part]["new_tokens"] == 8
    assert saved["decode"]["with_engram"]["cached_equals_uncached"]  # fp32: the memory keeps cached decoding exact
    alternated = saved["train"]["alternated"]  # memory on and off in alternating blocks of steps
    for side in ("memory_on", "memory_off"):
        assert len(alternated[side]["block_means_ms"]) == alternated["blocks"] == 6
        assert len(alternated[side]["step_ms"]) == 6 * alternated["steps_per_block"]
    assert info["model_params"] == saved["model_params"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engram_in_lm_benchmark_tiny_compiled(tmp_path):
    """--compile: the base compiled and run first, then add_engram; the memory must run."""
    out = tmp_path / "c.json"
    load("engram_in_lm").main(["--tiny", "--device", "cpu", "--compile", "--compile-backend", "eager", "--kernels", "torch",
                               "--steps", "1", "--warmup", "1", "--no-decode", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["config"]["compile"] and saved["decode"] is None
    assert saved["train"]["with_engram"]["memory_ran"]


def test_compiled_memory_check_tiny(tmp_path):
    """The compile diagnosis: with tables updated in backward, a compiled step gives them
    row gradients and trains them, and reads no table inside the compiled forward (the
    reads are made ahead); the library's functions it watches are restored afterwards."""
    from engram_llm_hash import hf

    hook = hf.HFInjector._layer_hook
    out = tmp_path / "m.json"
    assert load("compiled_memory_check").main(["--device", "cpu", "--rowwise", "--backend", "aot_eager", "--kernels", "torch", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["tables_changed"] == [True, True] and saved["table_gradients"] == ["torch.sparse_coo"] * 2
    path = [s[0] for s in saved["seen"]]
    assert path.count("layer hook") == 2 and path.count("block output") == 2 and "eager table read" not in path
    assert hf.HFInjector._layer_hook is hook


def test_hash_lookup_benchmark_tiny(tmp_path):
    out = tmp_path / "h.json"
    load("hash_lookup").main(["--tiny", "--device", "cpu", "--kernels", "torch", "--iters", "1", "--warmup", "0", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["copy"]["gb_per_s"] > 0 and saved["pieces"][0]["hash_us"] > 0
    assert [b["table_size"] for b in saved["blocks"]] == [1000, 10000]
    assert all(b["fwd_bwd_ms"] > 0 and b["kernels"] == "torch" for b in saved["blocks"])


def test_engram_offload_benchmark_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("engram_offload", SCRIPT.parent / "engram_offload.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "o.json"
    bench.main(["--tiny", "--device", "cpu", "--precision", "fp32", "--steps", "2", "--warmup", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["parts"]) == {"base", "device", "host", "host_no_prefetch"}
    assert all(p["step_ms_mean"] > 0 for p in saved["parts"].values())
    host, cold = saved["parts"]["host"]["table"], saved["parts"]["host_no_prefetch"]["table"]
    assert host["prefetch_hit_rate_l1"] == 1.0 and cold["prefetch_hit_rate_l1"] == 0.0
    assert host["host_bytes_per_step_l1"] > 0 and saved["overhead"]["host_vs_device"] is not None
