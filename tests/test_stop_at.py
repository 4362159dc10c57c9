"""`stages.N.stop_at`: a train stage ends at the first evaluation that reaches a threshold."""

from __future__ import annotations

import json
from pathlib import Path

from engram_core.testing.cli import run_cli
from engram_core.testing.dist import run_dirs

MINIMAL = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"
SHORT = ["stages.0.steps=200", "stages.0.eval_every=40", "stages.0.checkpoint_every=0", "--quiet"]


def _run(tmp_path, *overrides):
    r = run_cli(MINIMAL, *SHORT, *overrides, "--device", "cpu", "--out", str(tmp_path))
    dirs = run_dirs(tmp_path)
    return r, (dirs[0] if dirs else None)


def test_a_stage_stops_at_the_first_evaluation_that_reaches_the_threshold(tmp_path):
    # minimal's eval/loss starts positive and falls below 0 within 200 steps; stop when it is below 1e9: the first evaluation
    r, run_dir = _run(tmp_path, 'stages.0.stop_at={ metric = "eval/loss", threshold = 1e9, mode = "min" }')
    assert r.returncode == 0, r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["stopped_at"] == {"train": 40}
    assert summary["steps"] == 40  # the later stages ran; no training step after the stop
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_end = [rec for rec in records if rec["stage"] == "train" and rec["stage_end"]]
    assert len(train_end) == 1 and train_end[0]["stopped_at"] == 40 and train_end[0]["step"] == 40
    assert "final" in summary["stages"]  # the eval stage after it ran


def test_a_threshold_never_reached_trains_every_step(tmp_path):
    r, run_dir = _run(tmp_path, 'stages.0.stop_at={ metric = "eval/loss", threshold = -1e9, mode = "min" }')
    assert r.returncode == 0, r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_at"] == {} and summary["steps"] == 200


def test_a_metric_the_evaluation_does_not_give_is_one_line(tmp_path):
    r, _ = _run(tmp_path, 'stages.0.stop_at={ metric = "eval/los", threshold = 0.5, mode = "min" }')
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stages.0.stop_at.metric: the stage's evaluation gives no 'eval/los' (did you mean 'eval/loss'?)" in r.stderr, r.stderr


def test_stop_at_without_evaluations_is_one_line():
    r = run_cli(MINIMAL, "stages.0.eval_every=0", 'stages.0.stop_at={ metric = "eval/loss", threshold = 0.5 }', "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stages.0.stop_at: needs evaluations during the stage to stop at: set eval_every" in r.stderr
