"""`engram report` on a run and on a sweep; the across-seeds aggregation of sweep.md/csv."""

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from engram_core.sweep import sweep_tables
from engram_core.testing.cli import run_cli
from engram_core.tools.report import aggregate_seeds, config_groups, load_run, load_sweep, plot_curves, plot_sweep

MINIMAL = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"
SHRINK = ["stages.0.steps=40", "stages.0.eval_every=20", "stages.0.warmup_steps=5", "stages.0.checkpoint_every=0"]
PNG = b"\x89PNG\r\n\x1a\n"


def _only(path: Path) -> Path:
    (d,) = path.iterdir()
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    r = run_cli(MINIMAL, *SHRINK, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    return _only(out / "minimal")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    recipe = tmp / "sweep.toml"
    recipe.write_text(MINIMAL.read_text() + '\n[sweep]\n"head.hidden" = [16, 32]\n"run.seed" = [0, 1, 2]\n')
    r = run_cli(recipe, *SHRINK, "stages.0.steps=20", "--out", tmp / "runs", "--quiet")
    assert r.returncode == 0, r.stderr
    return _only(tmp / "runs" / "minimal")


def _png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == PNG


# ---- a run -------------------------------------------------------------------------------


def test_load_run_reads_summary_records_tensorboard_and_stages(run_dir):
    run = load_run(run_dir)
    assert run["name"] == "minimal" and run["summary"]["status"] == "completed"
    assert [(s["name"], s["kind"], s["start"], s["end"]) for s in run["stages"]] == [("train", "train", 0, 40), ("final", "eval", 40, 40)]
    assert [r["step"] for r in run["records"]] == [20, 40, 40]
    assert [s for s, _ in run["scalars"]["train/loss"]] == [10, 20, 30, 40]  # train/ is only in TensorBoard


def test_report_of_a_run(run_dir):
    r = run_cli("report", run_dir, tool="engram")
    assert r.returncode == 0, r.stderr
    md = (run_dir / "report" / "report.md").read_text()
    assert "](curves.png)" in md
    _png(run_dir / "report" / "curves.png")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "| metric | better | train | final |" in md
    row = f"| eval/loss | ↓ | {summary['stages']['train']['eval/loss']:.4g} | {summary['stages']['final']['eval/loss']:.4g} |"
    assert row in md
    assert "| train | train | 0–40 | yes |" in md


def test_report_out_option_and_plot_functions(run_dir, tmp_path):
    r = run_cli("report", run_dir, "--out", tmp_path / "elsewhere", tool="engram")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "elsewhere" / "report.md").exists()
    _png(tmp_path / "elsewhere" / "curves.png")
    assert plot_curves(load_run(run_dir), tmp_path / "c.png", prefixes=("train/",)) == tmp_path / "c.png"
    _png(tmp_path / "c.png")
    assert plot_curves(load_run(run_dir), tmp_path / "none.png", prefixes=("nothing/",)) is None


@pytest.mark.parametrize("what", ["missing", "empty", "file"])
def test_report_of_a_non_run_is_one_line_exit_2(tmp_path, what):
    target = tmp_path / "x"
    if what == "empty":
        target.mkdir()
    elif what == "file":
        target.write_text("not a directory")
    r = run_cli("report", target, tool="engram")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (target / "report").exists()


# ---- a sweep ----------------------------------------------------------------------------


def test_sweep_csv_and_md_aggregate_across_seeds(sweep_dir):
    plan = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    finals = [json.loads((sweep_dir / e["dir"] / "summary.json").read_text())["final"]["eval/loss"] for e in plan]
    rows = list(csv.DictReader(open(sweep_dir / "sweep.csv")))
    assert len(rows) == 6 and {"eval/loss_mean", "eval/loss_sd", "eval/loss_n"} <= set(rows[0])
    md = (sweep_dir / "sweep.md").read_text()
    assert "| 000 | 16 | 0 | completed |" in md  # the per-point table stays
    assert "## Across seeds" in md
    for hidden in ("16", "32"):
        vals = [f for f, e in zip(finals, plan) if str(e["point"]["head.hidden"]) == hidden]
        mean, sd = statistics.mean(vals), statistics.stdev(vals)
        for row in (r for r in rows if r["head.hidden"] == hidden):
            assert float(row["eval/loss_mean"]) == pytest.approx(mean, rel=1e-12)
            assert float(row["eval/loss_sd"]) == pytest.approx(sd, rel=1e-12)
            assert row["eval/loss_n"] == "3"
        dirs = ", ".join(e["dir"] for e in plan if str(e["point"]["head.hidden"]) == hidden)
        cell = f"{mean:.4g} ± {sd:.4g} (n=3: " + ", ".join(f"{v:.4g}" for v in vals) + ")"
        assert f"| {hidden} | {dirs} | 0, 1, 2 | 3 | {cell} |" in md


def test_report_of_a_sweep(sweep_dir):
    r = run_cli("report", sweep_dir, tool="engram")
    assert r.returncode == 0, r.stderr
    md = (sweep_dir / "report" / "report.md").read_text()
    assert "](sweep.png)" in md and "| 005 | 32 | 2 | completed |" in md and "## Across seeds" in md
    _png(sweep_dir / "report" / "sweep.png")
    sweep = load_sweep(sweep_dir)
    assert sweep["keys"] == ["head.hidden", "run.seed"] and len(sweep["summaries"]) == 6
    assert plot_sweep(sweep, sweep_dir / "report" / "x.png", metrics=["nothing"]) is None


def test_report_of_a_sweep_point_is_a_run_report(sweep_dir, tmp_path):
    r = run_cli("report", sweep_dir / "003", "--out", tmp_path, tool="engram")
    assert r.returncode == 0, r.stderr
    _png(tmp_path / "curves.png")


# ---- aggregation without running anything --------------------------------------------------


def test_aggregate_seeds_mean_sd_n_values():
    agg = aggregate_seeds([{"a": 1.0, "b": 2.0}, {"a": 3.0}, {"a": 5.0}])
    mean, sd, n, values = agg["a"]
    assert (mean, n, values) == (3.0, 3, [1.0, 3.0, 5.0]) and sd == pytest.approx(2.0)
    assert agg["b"][0] == 2.0 and agg["b"][2] == 1 and math.isnan(agg["b"][1])


def test_aggregate_seeds_uses_completed_summaries_and_stage_columns():
    done = {"status": "completed", "final": {"eval/loss": 1.0}, "stages": {"pre": {"eval/loss": 4.0}, "post": {"eval/loss": 1.0}}}
    other = {"status": "completed", "final": {"eval/loss": 2.0}, "stages": {"pre": {"eval/loss": 6.0}, "post": {"eval/loss": 2.0}}}
    broken = {"status": "nonfinite", "final": {"eval/loss": 100.0}, "stages": {}}
    agg = aggregate_seeds([done, other, broken])
    assert agg["eval/loss"][2:] == (2, [1.0, 2.0])
    assert agg["pre:eval/loss"][0] == 5.0  # an earlier stage is a column of its own, as in sweep.csv
    assert aggregate_seeds([broken], completed_only=False)["eval/loss"][2] == 1


def test_config_groups():
    plan = [{"point": {"m": m, "run.seed": s}} for m in ("a", "b") for s in (0, 1)]
    assert config_groups(plan) == [({"m": "a"}, [0, 1]), ({"m": "b"}, [2, 3])]
    assert config_groups([{"point": {"run.seed": s}} for s in (0, 1, 2)]) == [({}, [0, 1, 2])]
    assert len(config_groups([{"point": {"m": m}} for m in ("a", "b")])) == 2


def _fake_sweep(tmp_path: Path, points: list[dict], finals: list[float | None]) -> list[dict]:
    plan = [{"index": i, "label": str(p), "point": p, "dir": f"{i:03d}"} for i, p in enumerate(points)]
    for e, f in zip(plan, finals):
        (tmp_path / e["dir"]).mkdir()
        if f is not None:
            summary = {"status": "completed" if f == f else "nonfinite", "final": {"eval/loss": f}, "stages": {"t": {"eval/loss": f}}}
            (tmp_path / e["dir"] / "summary.json").write_text(json.dumps(summary))
    return plan


def test_sweep_tables_without_seed_key_have_no_aggregate(tmp_path):
    plan = _fake_sweep(tmp_path, [{"head.hidden": 8}, {"head.hidden": 16}], [1.0, 2.0])
    csv_text, md = sweep_tables(tmp_path, plan)
    assert "_mean" not in csv_text and "Across seeds" not in md


def test_sweep_tables_seed_only_with_failed_and_missing_points(tmp_path):
    plan = _fake_sweep(tmp_path, [{"run.seed": s} for s in range(4)], [1.0, 3.0, float("nan"), None])
    csv_text, md = sweep_tables(tmp_path, plan)
    rows = list(csv.DictReader(csv_text.splitlines()))
    assert [r["status"] for r in rows] == ["completed", "completed", "nonfinite", "not run"]
    assert {r["eval/loss_mean"] for r in rows} == {"2.0"} and {r["eval/loss_n"] for r in rows} == {"2"}
    assert "| 000, 001, 002, 003 | 0, 1, 2, 3 | 2 | 2 ± 1.414 (n=2: 1, 3) |" in md
