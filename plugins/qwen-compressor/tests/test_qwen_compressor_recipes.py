"""Every recipe of the plugin runs end to end through engram-run (shrunk by overrides),
and bad input is a one-line error with exit status 2."""

import json
from pathlib import Path

import pytest

from engram_core.testing.cli import run_cli

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
NAMES = ["budget_sweep", "collapse_debug", "template_oracle", "lora_reader", "contrastive", "overfit_one", "reader_as_encoder"]
TRAIN_STAGE = {"collapse_debug": 2}  # index of the training stage (1 elsewhere)


def shrink(name):
    i = TRAIN_STAGE.get(name, 1)
    return [
        "data.n_train=48", "data.n_eval=8",
        "stages.0.options={steps = 2, lr = 1e-3, batch_size = 4, modes = [\"summary\"], budgets = [64]}",
        f"stages.{i}.steps=2", f"stages.{i}.batch_size=4", f"stages.{i}.eval_every=0",
        "metrics.0.max_examples=8", "metrics.1.max_examples=8",
    ]


def run(name, tmp_path, *extra):
    return run_cli(RECIPES / f"{name}.toml", *shrink(name), *extra, "--out", tmp_path / "runs", "--quiet",
                   plugins="qwen-compressor", env={"ENGRAM_CACHE": str(tmp_path / "cache")})


@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs(name, tmp_path):
    r = run(name, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")]
    assert summaries and all(s["status"] == "completed" for s in summaries)
    final = summaries[0]["final"]
    assert final["acc/chance"] == 0.1 and any(k.startswith("acc/latent_b") for k in final)
    assert "collapse/batch_cos" in final and "memory/param_update" in final
    if name == "budget_sweep":
        assert {f"acc/{m}_b{b}" for m in ("discard", "summary", "latent", "oracle_kv") for b in (64, 96, 128)} <= set(final)
    # the pretrained reader was cached by content: a second run loads it
    assert list((tmp_path / "cache" / "qwen-compressor").glob("reader-*.pt"))


@pytest.mark.parametrize(
    "override, expect",
    [
        ("memory.n_slots=0", "memory.n_slots: must be > 0"),
        ("data.budgets=[64, 200]", "larger than the prompt"),
        ("data.gold_fields=false", "gold_fields"),
        ("memory.out_dim=48", "memory.out_dim: the encoder projects to 48 but the reader's embedding width is 64"),
    ],
)
def test_bad_input_is_one_line_exit_2(override, expect, tmp_path):
    r = run("budget_sweep", tmp_path, override)
    assert r.returncode == 2, r.stdout[-1000:] + r.stderr[-1000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("budget", [129, 140, 159])
def test_metric_budget_beyond_the_data_fails_at_validate(budget, tmp_path):
    """A metric budget between the data's largest (128) and the shortest context used to fail
    only at the first evaluation, after reader pretraining; `engram validate` says it now."""
    r = run_cli("validate", RECIPES / "budget_sweep.toml", "data.n_train=48", "data.n_eval=8",
                f"metrics.0.budgets=[64, {budget}]", tool="engram", plugins="qwen-compressor",
                env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.strip()]
    assert "budget_sweep.toml" in line and "metrics.0.budgets" in line and f"add {budget} to data.budgets" in line
