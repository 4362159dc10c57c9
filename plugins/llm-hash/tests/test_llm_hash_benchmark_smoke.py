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
    assert info["model_params"] == saved["model_params"]
