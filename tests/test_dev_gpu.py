"""dev/gpu's device driver, run as on the lent GPU machine but on this machine's CPU, in a clone
of the checkout: a page run the deadline stops comes back within the machine's file limits,
unpacks here, and goes on from its checkpoints on a new machine; row globs reach the pipeline
unexpanded. The install step is the one part left out (the venv here has every package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.name == "nt" or not shutil.which("git") or not shutil.which("bash"),
                                reason="bash scripts driving a git checkout")

PAGE = """
[[rows]]
id = "sweep"
recipe = "recipes/minimal.toml"
overrides = ["stages.0.steps=1000000", "stages.0.eval_every=20", "stages.0.log_every=20",
             'sweep."stages.0.lr"=[1e-5, 3e-3]', 'select={ metric = "eval/loss", mode = "min", then = { "run.seed" = [1] } }']

[[tables]]
id = "main"
rows = ["*"]
columns = [{ key = "eval/loss", label = "eval loss" }]
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A committed clone with this work tree's driver and a page of one [select] row that never ends."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(repo)], check=True, capture_output=True)
    for script in (ROOT / "dev" / "gpu").glob("*.sh"):
        shutil.copy(script, repo / "dev" / "gpu" / script.name)
    (repo / "docs" / "results" / "gputrial.toml").write_text(PAGE)
    (repo / "docs" / "results" / "gputrial.md").write_text("# trial\n\n<!-- results:table main -->\n<!-- results:end -->\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "--quiet", "--allow-empty", "-m", "trial page")
    return repo


def _call(repo: Path, machine: Path, out: Path, deadline: int) -> str:
    """One device call: the driver with this venv's Python on a machine whose set-up is done."""
    (machine / "site").mkdir(parents=True, exist_ok=True)
    (machine / "site" / ".ready").touch()
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("ENGRAM_CHECKOUT", "ENGRAM_RESULTS_COMMIT")}
    env |= {"OUT": str(out), "PY": sys.executable, "ENGRAM_GPU_STATE": str(machine), "DEADLINE": str(deadline), "CKPT": "20",
            "RUNS": "t|gputrial|2|cpu|sw*"}
    r = subprocess.run(["bash", "dev/gpu/page_runs.sh"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.stat().st_size <= 16 * 2**20 for p in out.iterdir()), files  # what the machine returns
    return r.stdout


def _reached(repo: Path) -> dict[str, int]:
    (run,) = json.loads((repo / "docs/results/data/gputrial/sweep.json").read_text())["runs"]
    assert run["status"] == "timeout"
    return {p["label"]: p["step"] for p in run["points_reached"]}


def test_a_page_run_stopped_on_one_machine_goes_on_from_its_checkpoints_on_the_next(clone: Path, tmp_path: Path):
    first = _call(clone, tmp_path / "machine1", tmp_path / "out1", deadline=18)
    assert "--rows sw* --device cpu" in first  # the glob went to the pipeline as it was written
    out1 = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert out1[0].startswith("ckpt-") and out1[1:] == ["kept.tgz.00", "rows.tgz"]
    with tarfile.open(tmp_path / "out1" / "rows.tgz") as tar:
        assert {"data/gputrial/sweep.json", "logs/t.log", "logs/setup.log"} <= {os.path.normpath(n) for n in tar.getnames()}

    subprocess.run(["bash", "dev/gpu/unpack.sh", str(tmp_path / "out1")], cwd=clone, check=True, capture_output=True)
    before = _reached(clone)
    assert sorted(p.name for p in (clone / ".gpu" / "kept").iterdir()) == [out1[0].rsplit(".", 1)[0], "t.tgz"]

    second = _call(clone, tmp_path / "machine2", tmp_path / "out2", deadline=18)  # a new machine: nothing in its /tmp
    assert "t: unpacked the kept page run" in second and " --resume " in second
    subprocess.run(["bash", "dev/gpu/unpack.sh", str(tmp_path / "out2")], cwd=clone, check=True, capture_output=True)
    after = _reached(clone)
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before), (before, after)
