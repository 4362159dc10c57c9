"""The plugin is found through its entry point, and its recipe runs end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "example_slots.toml"


def test_listed_by_engram_plugins():
    out = subprocess.run([sys.executable, "-m", "engram_core.cli", "plugins", "--json"], capture_output=True, text=True, check=True)
    plugins = {p["name"]: p for p in json.loads(out.stdout)}
    assert "example-slots" in plugins
    assert not plugins["example-slots"]["broken"]
    assert "memory kv_slots" in plugins["example-slots"]["components"]


def test_recipe_runs(tmp_path):
    env = {**os.environ, "ENGRAM_PLUGINS": "example-slots"}
    cmd = [sys.executable, "-c", "from engram_core.cli import run_main; raise SystemExit(run_main())", str(RECIPE),
           "stages.0.steps=40", "stages.1.steps=40", "--out", str(tmp_path), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "example_slots").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert set(summary["stages"]) == {"head", "with_memory", "memory_off"}
    assert "memory/gate_mean" in summary["stages"]["with_memory"]
