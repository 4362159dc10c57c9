"""End to end through the engine: every recipe validates; a tiny needle run writes per_epoch.csv,
memory/* TensorBoard scalars, opens the gate, and resumes to the same result; bad input exits 2."""

import csv
import json
from pathlib import Path

import pytest

from engram_core.cli import main, run_main

ROOT = Path(__file__).resolve().parents[3]
RECIPES = ["needle_len256", "needle_len512", "needle_len1024", "len768_guard", "listops_lite", "lambda_sweep", "multi_seed"]

TINY = ["data.seq_len=24", "data.n_pairs=2", "data.n_train=64", "data.n_eval=32", "head.hidden=16", "head.embed=16",
        "memory.dim=32", "stages.0.steps=8", "stages.0.eval_every=2", "stages.0.checkpoint_every=4", "stages.0.batch_size=8",
        "stages.0.objective.nce_scheduler.warm_start_epochs=1", "stages.0.objective.nce_scheduler.require_read=false",
        "stages.0.objective.nce_scheduler.lr_restart_factor=0.5"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_validate(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["validate", f"recipes/{name}.toml"]) == 0


def _run_dir(out: Path) -> Path:
    runs = sorted(p for p in (out / "needle_len256").iterdir() if p.is_dir())
    return runs[-1]


def test_tiny_needle_run_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    rc = run_main([str(ROOT / "recipes/needle_len256.toml"), *TINY, "--out", str(tmp_path / "runs"), "--quiet", "--device", "cpu"])
    assert rc == 0
    run = _run_dir(tmp_path / "runs")
    rows = list(csv.DictReader((run / "per_epoch.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [r["gate_open"] for r in rows] == ["0", "1", "1", "1"]  # opens after the warm-start epoch
    assert float(rows[1]["lambda"]) == pytest.approx(0.001) and float(rows[1]["lr_scale"]) == pytest.approx(0.5)
    assert all(r["raw_read_cos"] and r["solver_iters"] for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    text = json.dumps(summary)
    assert "eval/best_acc" in text and "memory/raw_read_cos" in text

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("memory/lambda", "memory/read_ema", "memory/gate_open_fraction", "memory/post_gate_drop",
                "memory/raw_read_cos", "memory/write_cos", "memory/solver_iters", "eval/acc", "train/nce"):
        assert tag in tags, tag
    assert [e.value for e in acc.Scalars("memory/gate_open")] == [0.0, 1.0, 1.0, 1.0]


def test_bad_input_exits_2(tmp_path, capsys):
    recipe = str(ROOT / "recipes/needle_len256.toml")
    for override, words in [("memory.dim=106", "not suited to the FFT path"),
                            ("stages.0.objective.nce_scheduler.read_threshold=1.5", "must be in [0, 1]"),
                            ("stages.0.objective.nce_scheduler.lambda_max=0.0001", "below its start"),
                            ("data.seq_len=8", "shorter than the needle layout"),
                            ("memory.alpha=0.99", "only rescales β")]:
        assert run_main([recipe, override, "--dry-run", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr()
        line = [x for x in (err.err + err.out).splitlines() if words in x]
        assert len(line) == 1, (override, err)


def test_resume_continues_the_schedule_exactly(tmp_path, monkeypatch):
    """Interrupt after the step-4 checkpoint, resume, and compare with an uninterrupted run."""
    from engram_deq_hrr.objective import DEQHRRTaskObjective

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    recipe = str(ROOT / "recipes/needle_len256.toml")
    args = [recipe, *TINY, "--quiet", "--device", "cpu"]
    assert run_main([*args, "--out", str(tmp_path / "full")]) == 0
    full = _run_dir(tmp_path / "full")

    original = DEQHRRTaskObjective.on_step_end

    def crash(self, event):
        original(self, event)
        if event.step == 6:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(DEQHRRTaskObjective, "on_step_end", crash)
    assert run_main([*args, "--out", str(tmp_path / "cut")]) != 0  # the engine reports the interruption
    monkeypatch.setattr(DEQHRRTaskObjective, "on_step_end", original)
    cut = _run_dir(tmp_path / "cut")
    assert run_main(["--resume", str(cut), "--quiet", "--device", "cpu"]) == 0

    def table(run):
        return [{k: v for k, v in r.items()} for r in csv.DictReader((run / "per_epoch.csv").open())]

    assert table(cut) == table(full)
