"""Launch a recipe over N gloo ranks from a test, the way a user does (`engram-run --nproc N`).

    from engram_core.testing.dist import run_ranks, run_dirs, final_metrics
    r = run_ranks("recipes/minimal.toml", "stages.0.steps=40", out=tmp_path / "runs")
    assert r.returncode == 0, r.stderr
    (run_dir,) = run_dirs(tmp_path / "runs")

Each call is a real torchrun (`python -m engram_core.run --nproc N`, which runs
torch.distributed.run --standalone): separate processes, a gloo process group on localhost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _env(plugins: str | None, extra: dict | None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # N ranks on a small CI machine
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if plugins is None:
        env.pop("ENGRAM_PLUGINS", None)
    else:
        env["ENGRAM_PLUGINS"] = plugins
    env.update(extra or {})
    return env


def command(*args, nproc: int = 2, out: Path | None = None, device: str = "cpu") -> list[str]:
    cmd = [sys.executable, "-m", "engram_core.run", "--nproc", str(nproc), "--quiet", "--device", device]
    if out is not None:
        cmd += ["--out", str(out)]
    return cmd + [str(a) for a in args]


def run_ranks(*args, nproc: int = 2, out: Path | None = None, plugins: str | None = "", env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args, nproc=nproc, out=out), env=_env(plugins, env), capture_output=True, text=True, timeout=timeout)


def start_ranks(*args, nproc: int = 2, out: Path | None = None, plugins: str | None = "", env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(command(*args, nproc=nproc, out=out), env=_env(plugins, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pids(launcher_pid: int, nproc: int = 2, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} of the workers torchrun (at `launcher_pid`) started, read from /proc (Linux)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        try:
            children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
        except OSError:
            children = []
        for pid in map(int, children):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in environ:
                if item.startswith(b"RANK="):
                    found[int(item[5:])] = pid
        if len(found) == nproc:
            return found
        time.sleep(0.05)
    raise TimeoutError(f"torchrun (pid {launcher_pid}) did not start {nproc} ranks")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def run_dirs(out: Path) -> list[Path]:
    """Every run directory under an --out folder (runs/<name>/<stamp>/)."""
    return sorted(p.parent for p in Path(out).glob("*/*/recipe.toml"))


def final_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """summary.json's per-stage final metrics."""
    return json.loads((Path(run_dir) / "summary.json").read_text())["stages"]


def max_relative_difference(a: dict, b: dict) -> float:
    """The largest |x - y| / max(|y|, 1) over two summaries' metrics (same keys required):
    relative for values above 1, absolute below (a metric near 0 has no useful relative error)."""
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    worst = 0.0
    for stage in a:
        assert a[stage].keys() == b[stage].keys(), (stage, sorted(a[stage]), sorted(b[stage]))
        for k, x in a[stage].items():
            y = b[stage][k]
            worst = max(worst, abs(x - y) / max(abs(y), 1.0) if x != y else 0.0)
    return worst
