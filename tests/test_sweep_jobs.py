"""`engram-run --jobs N`: a sweep's points run at once, each in its own process, and the sweep
directory is what a sequential sweep writes (timings aside).

CPU numerics depend on the thread count (the last bits of float sums), so both sweeps run with
OMP_NUM_THREADS=1: the parallel points then use the same count as the sequential ones.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engram_core.recipe import load_recipe
from engram_core.run import threads
from engram_core.sweep import _report_point
from engram_core.testing.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"time_s", "wall_time_s", "saved_at", "started", "run_dir"}


@pytest.fixture(autouse=True)
def one_thread_and_a_private_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv(threads.AUTO_ENV, raising=False)
    monkeypatch.setenv(threads.RUNTIME_DIR_ENV, str(tmp_path / "rt"))
    monkeypatch.setenv("ENGRAM_PLUGINS", "")  # core components only, in the points' processes too


def sweep_recipe(tmp_path: Path, lrs=("1e-3", "3e-3"), steps: int = 20, sweep: str | None = None) -> Path:
    text = (ROOT / "recipes" / "minimal.toml").read_text()
    for old, new in (("steps = 600", f"steps = {steps}"), ("batch_size = 128", "batch_size = 16"), ("eval_every = 200", "eval_every = 10"),
                     ("checkpoint_every = 200", "checkpoint_every = 10"), ("warmup_steps = 50", "warmup_steps = 5")):
        text = text.replace(old, new)
    p = tmp_path / "sweep.toml"
    p.write_text(text + "\n[sweep]\n" + (sweep or f'"stages.0.lr" = [{", ".join(lrs)}]') + "\n")
    return p


def only_sweep(out: Path) -> Path:
    (sweep,) = (out / "minimal").iterdir()
    return sweep


def files_of(sweep: Path) -> list[str]:
    """Relative paths, TensorBoard event files by folder (their names hold a time and a pid)."""
    return sorted(str(p.parent.relative_to(sweep) / "events") if p.name.startswith("events.out.tfevents")
                  else str(p.relative_to(sweep)) for p in sweep.rglob("*") if p.is_file())


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def scalars(point_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(point_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if not tag.startswith("throughput/")}


def assert_same_tensors(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in TIMING_KEYS:
                assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_jobs_2_writes_what_a_sequential_sweep_writes(tmp_path):
    p = sweep_recipe(tmp_path)
    seq, par = tmp_path / "seq", tmp_path / "par"
    r1 = run_cli(p, "--out", seq, "--quiet")
    r2 = run_cli(p, "--out", par, "--quiet", "--jobs", "2")
    assert r1.returncode == 0, r1.stderr
    assert r2.returncode == 0, r2.stderr
    a, b = only_sweep(seq), only_sweep(par)
    assert b.name.endswith("-sweep")
    assert files_of(a) == files_of(b)
    def text(d: Path, name: str) -> str:  # the two sweeps' --out differ
        return (d / name).read_text().replace(str(seq if d.is_relative_to(seq) else par), "OUT")

    for name in ("sweep.csv", "sweep.md", "sweep.json", "recipe.toml"):
        assert text(a, name) == text(b, name), name
    rows = list(csv.DictReader((b / "sweep.csv").open()))
    assert [row["point"] for row in rows] == ["000", "001"] and {row["status"] for row in rows} == {"completed"}
    for point in ("000", "001"):
        assert text(a / point, "recipe.toml") == text(b / point, "recipe.toml")
        for name in ("summary.json", "env.json"):
            assert without_timings(json.loads(text(a / point, name))) == without_timings(json.loads(text(b / point, name))), name
        records = [[without_timings(json.loads(line)) for line in (d / point / "metrics.jsonl").read_text().splitlines()] for d in (a, b)]
        assert records[0] == records[1] and records[0]
        assert scalars(a / point) == scalars(b / point)
        assert_same_tensors(*(torch.load(d / point / "checkpoints" / "last.pt", weights_only=False) for d in (a, b)))
    # one line per point as it ends, no progress bars
    ended = sorted(line.split(" completed in ")[0] for line in r2.stdout.splitlines() if line.startswith("point "))
    assert ended == ["point stages.0.lr=0.001", "point stages.0.lr=0.003"]
    assert "2 at a time (OMP_NUM_THREADS=1 each, as set)" in r2.stdout


@pytest.mark.parametrize("sweep, label, status", [
    ('"stages.0.lr" = [1e-3, 1e30]', "stages.0.lr=1e+30", "nonfinite"),  # the loss is not finite at once
    ('"stages.0.train" = [["*"], ["nothing*"]]', "stages.0.train=['nothing*']", "failed"),  # an error naming the recipe file
])
def test_a_failed_point_is_reported_as_the_sequential_sweep_reports_it(tmp_path, sweep, label, status):
    p = sweep_recipe(tmp_path, sweep=sweep)
    seq, par = tmp_path / "seq", tmp_path / "par"
    r1 = run_cli(p, "--out", seq, "--quiet")
    r2 = run_cli(p, "--out", par, "--quiet", "--jobs", "2")
    assert r1.returncode == r2.returncode == 1
    failed = [[line for line in r.stdout.splitlines() if line.startswith(f"point {label} failed: ")] for r in (r1, r2)]
    assert len(failed[0]) == len(failed[1]) == 1
    if status == "failed":
        assert failed[1][0].startswith(f"point {label} failed: {p}: stages.0.train.0: pattern 'nothing*' matches no parameter")
    a, b = only_sweep(seq), only_sweep(par)
    assert failed[0][0].replace(str(a), "SWEEP") == failed[1][0].replace(str(b), "SWEEP")
    rows = [(d / "sweep.csv").read_text().replace(str(d), "SWEEP") for d in (a, b)]
    assert rows[0] == rows[1]
    assert [row["status"] for row in csv.DictReader((b / "sweep.csv").open())] == ["completed", status]
    assert "1 of 2 points failed" in r2.stdout


def test_a_point_whose_process_died_gets_a_failed_row(tmp_path, capsys):
    """A point killed from outside (out of memory, kill -9) records nothing itself: the sweep writes its row."""
    from rich.console import Console

    p = sweep_recipe(tmp_path)
    recipe = load_recipe(p)
    sweep = tmp_path / "s"
    sweep.mkdir()
    entry = {"index": 1, "label": "stages.0.lr=0.003", "point": {"stages.0.lr": 0.003}, "dir": "001"}
    ok = _report_point(recipe, sweep, entry, -signal.SIGKILL, "loading...\nstep 3\n", 1.0, "1/2", Console())
    assert not ok
    out = capsys.readouterr().out
    assert "point stages.0.lr=0.003 failed: its process was killed by SIGKILL" in out and "| step 3" in out
    summary = json.loads((sweep / "001" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "its process was killed by SIGKILL"


@pytest.mark.parametrize("args, expected", [(["--jobs", "0"], "--jobs: expected a number of points at once >= 1"),
                                            (["--jobs", "2", "--nproc", "2"], "--jobs: cannot be combined with a distributed run")])
def test_bad_jobs_is_one_line_and_exit_2(tmp_path, args, expected):
    r = run_cli(sweep_recipe(tmp_path), "--out", tmp_path / "runs", *args)
    assert r.returncode == 2
    assert r.stderr.startswith(f"error: {expected}") and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_jobs_without_a_sweep_is_a_note_and_one_run(tmp_path):
    p = sweep_recipe(tmp_path)
    p.write_text(p.read_text().split("\n[sweep]")[0])
    r = run_cli(p, "--out", tmp_path / "runs", "--quiet", "--jobs", "3")
    assert r.returncode == 0, r.stderr
    assert "note: --jobs 3 runs the points of a sweep at once; this is one run" in r.stderr
    assert len(list((tmp_path / "runs" / "minimal").iterdir())) == 1


@pytest.mark.parametrize("started_with, stopped_by", [
    (signal.SIG_DFL, signal.SIGINT),  # a shell's foreground job, kill -INT
    (signal.SIG_IGN, signal.SIGTERM),  # a background job (SIGINT ignored, inherited), the results pipeline's deadline
], ids=["foreground-sigint", "background-sigterm"])
def test_ctrl_c_interrupts_every_point_and_leaves_a_resumable_sweep(tmp_path, started_with, stopped_by):
    p = sweep_recipe(tmp_path, steps=1_000_000)
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "engram_core.run", str(p), "--out", str(out), "--quiet", "--jobs", "2"],
                            env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, started_with))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("minimal/*/*/checkpoints/last.pt"))) < 2:
        time.sleep(0.2)  # both points are training
    proc.send_signal(stopped_by)  # the sweep's process only, as kill does
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    sweep = only_sweep(out)
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [row["status"] for row in rows] == ["interrupted", "interrupted"]
    assert f"engram-run --resume {sweep} --jobs 2" in stdout
    assert threads.live_processes() == 1  # the points ended (their registrations are gone or dead)


def test_resume_with_jobs_runs_only_the_unfinished_points(tmp_path):
    import shutil

    out = tmp_path / "runs"
    assert run_cli(sweep_recipe(tmp_path), "--out", out, "--quiet").returncode == 0
    sweep = only_sweep(out)
    done = (sweep / "000" / "summary.json").read_text()
    completed = json.loads((sweep / "001" / "summary.json").read_text())
    (sweep / "001" / "summary.json").unlink()  # as if killed before the point finished
    shutil.rmtree(sweep / "001" / "checkpoints")
    r = run_cli("--resume", sweep, "--quiet", "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert "1 of 2 points to run" in r.stdout
    assert (sweep / "000" / "summary.json").read_text() == done  # untouched
    again = json.loads((sweep / "001" / "summary.json").read_text())
    assert again["status"] == "completed" and again["final"] == completed["final"]
    assert (sweep / "sweep.csv").read_text().count(",completed,") == 2
