"""What a run prints: the final table with directions and regressions, the next commands,
and lines that stay whole in a log (no terminal: rich would wrap at 80 columns)."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
from rich.console import Console

from engram_core.cli import own_doc, print_markdown_tables, print_summary
from engram_core.run.commands import runnable
from engram_core.run.metric_info import HIGHER, LOWER, UNKNOWN, MetricInfo, TagInfo, for_run, got_worse
from engram_core.run.progress import Progress

from .conftest import run_cli


def _log_console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=80, highlight=False), buf  # a StringIO is no terminal: as in CI


def test_got_worse_follows_the_declared_direction():
    lower, higher, unknown = TagInfo(LOWER), TagInfo(HIGHER), TagInfo(UNKNOWN)
    assert got_worse(lower, 1.68, 4.23) and not got_worse(lower, 4.23, 1.68)
    assert got_worse(higher, 0.9, 0.5) and not got_worse(higher, 0.5, 0.9)
    assert not got_worse(unknown, 1.0, 100.0)
    assert got_worse(lower, 1.0, math.inf) and got_worse(lower, 1.0, math.nan)
    assert not got_worse(lower, -2.18309561, -2.18309585) and not got_worse(lower, 1.0, 1.0 + 1e-12)  # rounding, not a change
    assert got_worse(lower, 1.0, 1.001)
    assert not got_worse(lower, None, 1.0)


def test_declarations_match_names_and_globs_and_resolve_references():
    from engram_core import Metric
    from engram_core.builtin.lm import CompletionAccuracy

    class Rollouts(Metric):  # tags under a configurable prefix (as audio-mimi's `generate`)
        directions = {"*/spectral_distance": "lower"}

    recipe = {"data": {"type": "mqar", "vocab_size": 64}}
    info = MetricInfo.from_classes([CompletionAccuracy, Rollouts], recipe)
    assert info.of("eval/acc").direction == HIGHER
    assert info.of("eval/acc").levels({}) == {"chance": pytest.approx(1 / 32)}
    assert info.of("eval/params").is_cost and info.of("eval/tokens_per_s").is_cost
    assert info.of("generate_mean/spectral_distance").direction == LOWER  # a glob over the configurable prefix
    assert info.of("train/loss").direction == LOWER  # the engine's own tag
    assert info.of("vmf/kappa_mean") == TagInfo(UNKNOWN, "vmf", {})
    other = MetricInfo.from_classes([CompletionAccuracy], {"data": {"type": "exact_match"}})
    assert other.of("eval/acc").levels({}) == {}  # chance is mqar's: no line for another data set


def _fake_run(tmp_path: Path, stages: dict) -> Path:
    run = tmp_path / "runs" / "r" / "20261205-000000-abcdef"
    run.mkdir(parents=True)
    (run / "recipe.toml").write_text('[run]\nname = "r"\n\n[[metrics]]\ntype = "loss"\n\n[[metrics]]\ntype = "core:completion_accuracy"\n')
    summary = {"name": "a_recipe_with_a_long_name_for_the_title", "status": "completed", "steps": 2300, "wall_time_s": 27.4,
               "stages": stages}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_final_table_marks_directions_and_flags_what_got_worse(tmp_path):
    run = _fake_run(tmp_path, {
        "pre": {"eval/loss": -60.0, "eval/seq_acc": 0.9, "eval/params": 1.68, "eval/a_very_long_metric_name_that_is_wide": 1.0},
        "post": {"eval/loss": -70.0, "eval/seq_acc": 0.5, "eval/params": 4.23, "eval/a_very_long_metric_name_that_is_wide": 2.0},
    })
    console, buf = _log_console()
    print_summary(console, json.loads((run / "summary.json").read_text()), run)
    out = buf.getvalue()
    lines = out.splitlines()
    assert lines[0] == "a_recipe_with_a_long_name_for_the_title: final metrics (completed, 2300 steps, 27s)"  # one line
    row = next(l for l in lines if "eval/params" in l)  # lower is better (completion_accuracy declares it)
    assert "↓" in row and "4.2300 (worse)" in row and "1.6800 (worse)" not in row
    row = next(l for l in lines if "eval/seq_acc" in l)  # higher is better
    assert "↑" in row and "0.5000 (worse)" in row and "0.9000 (worse)" not in row
    assert "-70.0000 (worse)" not in out  # the loss fell: better
    assert "got worse: eval/seq_acc, eval/params" in out
    assert any("eval/a_very_long_metric_name_that_is_wide" in l for l in lines)  # not folded at 80 columns
    hint = next(l for l in lines if l.startswith("review it:"))
    command = hint.split()[2]
    assert command == "tensorboard" or (os.path.isabs(command) and os.access(command, os.X_OK))  # runs as printed
    assert hint.endswith(f"--logdir {run}")


def test_runnable_names_the_environments_copy_when_the_shell_would_not_find_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # the venv is not activated
    import sys

    bin_dir = Path(sys.executable).parent
    if (bin_dir / "engram-run").exists():
        assert runnable("engram-run") == str((bin_dir / "engram-run").absolute())
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{tmp_path}")
    assert runnable("engram-run") == "engram-run"
    assert runnable("no-such-command-here") == "no-such-command-here"


def test_run_info_comes_from_the_recipes_metric_classes(tmp_path):
    run = _fake_run(tmp_path, {"final": {"eval/loss": 1.0}})
    info = for_run(run)
    assert info.of("eval/loss").direction == LOWER
    assert info.of("eval/params").direction == LOWER  # completion_accuracy's own declaration, found from recipe.toml
    assert info.of("eval/seq_acc").direction == HIGHER
    assert for_run(tmp_path / "nowhere").of("eval/loss").direction == LOWER  # the engine's tags are known anyway


def test_progress_lines_are_whole_and_a_repeated_eval_line_is_printed_once():
    console, buf = _log_console()
    p = Progress(console)
    p.start("train", 100)
    long = "eval @ 600 (1.6s): " + ", ".join(f"rollout/metric_{i}=1.234" for i in range(6))
    p.note(long)
    p.note(long.replace("(1.6s)", "(1.7s)"))  # the eval stage right after, at the same step
    p.note("eval @ 700 (0.1s): eval/loss=1")
    lines = buf.getvalue().splitlines()
    assert lines[1] == f"  {long}"  # one line, however long
    assert sum("eval @ 600" in l for l in lines) == 1
    assert lines[2] == "  eval @ 700 (0.1s): eval/loss=1"


def test_sweep_markdown_is_printed_as_tables():
    md = "| point | memory | eval/acc |\n|---|---|---|\n| 000 | none | 0.0431 |\n| 001 | a\\|b | 0.9 |\n\n## Across seeds\n\nmean ± sd over `run.seed`\n"
    console, buf = _log_console()
    print_markdown_tables(console, md)
    out = buf.getvalue()
    assert "|---|" not in out and "| point |" not in out
    assert "Across seeds" in out and "##" not in out and "`" not in out
    assert any("001" in l and "a|b" in l and "0.9" in l for l in out.splitlines())


def test_describe_shows_the_components_own_docstring_or_says_there_is_none():
    import attrs

    from engram_core import Memory

    class Bare(Memory):
        pass

    @attrs.frozen
    class BareConfig:
        """Slots written by outer products."""

    @attrs.frozen
    class NoDocConfig:
        pass

    assert own_doc(Bare) == ""  # not Memory's docstring
    assert own_doc(BareConfig) == "Slots written by outer products."
    assert own_doc(NoDocConfig) == ""
    r = run_cli("describe", "head", "mlp_gaussian", tool="engram")
    assert r.returncode == 0 and "(no docstring)" not in r.stdout


def test_validate_counts_in_the_singular(minimal_recipe):
    r = run_cli("validate", minimal_recipe, tool="engram")
    assert r.returncode == 0, r.stderr
    assert "(2 stages, 1 metric;" in r.stdout


def test_metric_info_json_round_trips_and_wins_over_the_recipe(tmp_path):
    from engram_core.builtin.dynamics import LossMetric
    from engram_core.builtin.lm import CompletionAccuracy
    from engram_core.run.metric_info import write_for_run

    run = _fake_run(tmp_path, {"final": {"eval/acc": 0.5}})
    write_for_run(run, [CompletionAccuracy], {"data": {"type": "mqar", "vocab_size": 16}})  # what the engine would write
    info = for_run(run)
    assert info.of("eval/acc").direction == HIGHER
    assert info.of("eval/acc").levels({}) == {"chance": 1 / 8}  # recipe.toml has no data table: only the JSON knows it
    write_for_run(run, [LossMetric], {})
    assert for_run(run).of("eval/acc").direction == UNKNOWN  # the recipe's completion_accuracy is not consulted then
