"""The example's memories against the core point contracts (written only against engram_core)."""

import torch
from engram_example_slots import (
    KeyValueSlotsConfig,
    KeyValueSlotsMemory,
    OuterProductTraceConfig,
    OuterProductTraceMemory,
)

from engram_core import BuildContext, DataSpec
from engram_core.testing.points import ResidualPointContract, TracePointContract, backbone_build


class TestOuterProductTracePoint(TracePointContract):
    def make_memory(self, seed):
        return OuterProductTraceMemory(OuterProductTraceConfig(key_dim=8, value_dim=8), backbone_build(width=self.width))


class TestKeyValueSlotsResidualPoint(ResidualPointContract):
    def make_memory(self, seed):
        return KeyValueSlotsMemory(KeyValueSlotsConfig(slots=4), BuildContext(spec=DataSpec(dim=self.width)))

    def close(self, memory):
        with torch.no_grad():
            memory.gate_logit.fill_(-1e4)


def test_the_trace_runs_in_the_memory_zoo_unchanged(tmp_path):
    """The zoo recipe with this plugin's memory (qualified name, a few steps)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    zoo = Path(__file__).resolve().parents[3] / "recipes" / "memory_zoo.toml"
    env = {**os.environ, "ENGRAM_PLUGINS": "example-slots"}
    cmd = [sys.executable, "-c", "from engram_core.cli import run_main; raise SystemExit(run_main())", str(zoo),
           'memory={ type = "example-slots:outer_product_trace" }', "sweep={}", "stages.0.steps=5", "data.n_train=64",
           "data.n_eval=32", "--out", str(tmp_path), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "memory_zoo").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and 0.0 <= summary["final"]["eval/acc"] <= 1.0


def test_the_state_size_counts_the_trace_the_cache_keeps():
    """The head counts a trace memory's state from `empty_trace`: what cached decoding keeps."""
    from engram_core.components import Model

    build = backbone_build(width=32, seq_len=24)
    head = build.head.eval()
    memory = OuterProductTraceMemory(OuterProductTraceConfig(key_dim=8, value_dim=6), build)
    Model(head, memory, "trace")
    ids = torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    write = torch.zeros_like(ids)
    write[:, :12] = 1
    with torch.no_grad():
        _, cache = head._run(ids, None, write, 1 - write, use_cache=True, check=False)
    kept = (sum(k.numel() + v.numel() for k, v in cache["kv"]) + cache["trace"].numel()) // 2
    assert head.state_size(24) == kept == 2 * 32 * 24 * 2 + 8 * 6
