"""`[select]`: a sweep chooses its best point by a metric, then runs it again (e.g. more seeds)."""

from __future__ import annotations

import json

from engram_core.testing.cli import run_cli


def _sweep(tmp_path, small_recipe, select: str, sweep: str = '"stages.0.lr" = [1e-5, 3e-3]'):
    p = tmp_path / "select.toml"
    p.write_text(small_recipe.read_text() + f"\n[sweep]\n{sweep}\n\n[select]\n{select}\n")
    out = tmp_path / "runs"
    return run_cli(p, "--out", out, "--quiet"), out


def test_the_best_point_is_chosen_recorded_and_run_again_with_then(small_recipe, tmp_path):
    r, out = _sweep(tmp_path, small_recipe, 'metric = "eval/loss"\nmode = "min"\nthen = { "run.seed" = [0, 1, 2] }')
    assert r.returncode == 0, r.stderr
    (sweep,) = (out / "minimal").iterdir()
    losses = {d: json.loads((sweep / d / "summary.json").read_text())["final"]["eval/loss"] for d in ("000", "001")}
    best = min(losses, key=losses.get)
    selection = json.loads((sweep / "selection.json").read_text())
    assert selection["chosen"]["dir"] == best and selection["chosen"]["value"] == losses[best]
    assert selection["mode"] == "min" and sorted(v for v in selection["values"].values()) == sorted(losses.values())
    plan = json.loads((sweep / "sweep.json").read_text())["points"]
    # seed 0 is the recipe's seed: the chosen point itself, not run twice; seeds 1 and 2 run after the grid
    assert [e["dir"] for e in plan] == ["000", "001", "002", "003"]
    assert [e.get("selected", False) for e in plan] == [False, False, True, True]
    assert [e["point"]["run.seed"] for e in plan[2:]] == [1, 2]
    assert all(e["point"]["stages.0.lr"] == plan[int(best)]["point"]["stages.0.lr"] for e in plan[2:])
    for d in ("002", "003"):
        assert json.loads((sweep / d / "summary.json").read_text())["status"] == "completed"
    md = (sweep / "sweep.md").read_text()
    assert "## Across seeds" in md and "| 002 |" in md
    assert "select:" in r.stdout and "has the lowest eval/loss" in r.stdout


def test_a_resumed_sweep_does_not_choose_again(small_recipe, tmp_path):
    r, out = _sweep(tmp_path, small_recipe, 'metric = "eval/loss"\nmode = "min"\nthen = { "run.seed" = [1] }')
    assert r.returncode == 0, r.stderr
    (sweep,) = (out / "minimal").iterdir()
    before = (sweep / "selection.json").read_text()
    again = run_cli("--resume", sweep, "--quiet")
    assert again.returncode == 0, again.stderr
    assert (sweep / "selection.json").read_text() == before
    assert len(json.loads((sweep / "sweep.json").read_text())["points"]) == 3


def test_a_metric_no_point_has_is_one_line_and_a_failure(small_recipe, tmp_path):
    r, out = _sweep(tmp_path, small_recipe, 'metric = "eval/acc"')
    assert r.returncode == 1
    assert "select: no completed point has the metric 'eval/acc'" in r.stdout
    (sweep,) = (out / "minimal").iterdir()
    assert not (sweep / "selection.json").exists()


def test_a_failed_point_is_counted_once_when_nothing_can_be_selected(small_recipe, tmp_path):
    """A one-point sweep whose point fails: one point failed (not two: the selection finding no
    point is its own line), and the sweep fails."""
    r, out = _sweep(tmp_path, small_recipe, 'metric = "eval/loss"', sweep='"stages.0.train" = [["nothing*"]]')
    assert r.returncode == 1
    assert "1 of 1 points failed" in r.stdout and "2 of 1" not in r.stdout
    assert "select: no completed point has the metric 'eval/loss'" in r.stdout


def test_bad_select_tables_are_one_line_each(small_recipe, tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(small_recipe.read_text() + '\n[select]\nmetric = "eval/loss"\n')
    r = run_cli(p, "--dry-run")
    assert r.returncode == 2 and "select: chooses among the points of a [sweep]; the recipe has none" in r.stderr
    r, _ = _sweep(tmp_path, small_recipe, 'metric = "eval/loss"\nmode = "best"')
    assert r.returncode == 2 and "select.mode: must be one of 'max', 'min', got 'best'" in r.stderr
    r, _ = _sweep(tmp_path, small_recipe, 'metric = "eval/loss"\nthen = { "stages.0.lr" = [1e-3] }')
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "select.then.stages.0.lr: the grid sweeps it already" in r.stderr


def test_select_with_points_at_once(small_recipe, tmp_path):
    p = tmp_path / "jobs.toml"
    p.write_text(small_recipe.read_text() + '\n[sweep]\n"stages.0.lr" = [1e-5, 3e-3]\n\n[select]\nmetric = "eval/loss"\nmode = "min"\n'
                 'then = { "run.seed" = [1] }\n')
    out = tmp_path / "runs"
    r = run_cli(p, "--out", out, "--quiet", "--jobs", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    (sweep,) = (out / "minimal").iterdir()
    plan = json.loads((sweep / "sweep.json").read_text())["points"]
    assert len(plan) == 3 and json.loads((sweep / "002" / "summary.json").read_text())["status"] == "completed"
