import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ROOT / "recipes" / "minimal.toml"


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def engram(*args, env_extra=None, tool="run"):
    """Run the CLI in this process with only the core plugin (hermetic); like subprocess.run."""
    import contextlib
    import io

    from engram_core import registry
    from engram_core.cli import main, run_main

    saved = {k: os.environ.get(k) for k in ["ENGRAM_PLUGINS", *(env_extra or {})]}
    os.environ.update({"ENGRAM_PLUGINS": "", **(env_extra or {})})
    registry._cached = None
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            from rich.console import Console  # noqa: F401  (rich reads sys.stdout at print time)

            code = (run_main if tool == "run" else main)([str(a) for a in args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        registry._cached = None
    return Result(code, out.getvalue(), err.getvalue())


def engram_subprocess(*args, env_extra=None, cwd=None, timeout=300, tool="run"):
    """Run the CLI in a subprocess with only the core plugin (hermetic)."""
    env = {**os.environ, "ENGRAM_PLUGINS": "", "PYTHONUNBUFFERED": "1"}
    env.update(env_extra or {})
    fn = "run_main" if tool == "run" else "main"
    cmd = [sys.executable, "-c", f"from engram_core.cli import {fn}; raise SystemExit({fn}())", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


@pytest.fixture
def small_recipe(tmp_path):
    """minimal.toml made quicker: 60 steps, eval/checkpoint every 20."""
    text = MINIMAL.read_text()
    text = text.replace("steps = 600", "steps = 60").replace("eval_every = 200", "eval_every = 20")
    text = text.replace("checkpoint_every = 200", "checkpoint_every = 20").replace("warmup_steps = 50", "warmup_steps = 5")
    p = tmp_path / "small.toml"
    p.write_text(text)
    return p
