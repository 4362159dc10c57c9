"""Commands that train nothing do not import torch (or torch._dynamo) they do not use.

Times are measured by benchmarks/startup.py; these tests check the cause of slowness
(which modules a command imports), which does not depend on the machine's load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str, env_extra: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter has imported after running `code`."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint('MODULES' + json.dumps(sorted(sys.modules)))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("MODULES"))
    return set(json.loads(line[len("MODULES"):]))


def test_help_of_engram_and_engram_run_imports_no_torch():
    mods = _modules_after("""
        from engram_core.cli import main, run_main
        for f, argv in ((main, ["--help"]), (run_main, ["--help"]), (main, ["report", "--help"]), (main, ["validate", "--help"])):
            try:
                f(argv)
            except SystemExit:
                pass
    """)
    assert "torch" not in mods
    assert "matplotlib" not in mods


def test_public_names_of_engram_core_still_import_on_use():
    mods = _modules_after("import engram_core")
    assert "torch" not in mods
    import engram_core
    from engram_core.components import Memory

    assert engram_core.Memory is Memory
    assert "hookimpl" in dir(engram_core)


def test_engram_plugins_does_not_import_torch_dynamo():
    mods = _modules_after("""
        from engram_core.cli import main
        assert main(["plugins"]) == 0
    """)
    assert "torch" in mods  # the plugins' modules define torch modules
    assert "torch._dynamo" not in mods  # sharded_rows disables compile on its lookup only when a table is built


def test_a_sharded_table_still_runs_its_lookup_eagerly_under_compile():
    import torch

    from engram_core.tables.sharded_rows import ShardedEmbedding, _routed_runs_eagerly

    _routed_runs_eagerly()
    _routed_runs_eagerly()  # once: not wrapped twice
    assert ShardedEmbedding._routed._engram_eager
    assert isinstance(ShardedEmbedding(8, 4)(torch.tensor([1, 2])), torch.Tensor)
