"""Every recipe of the plugin runs end to end through engram-run (shrunk by overrides),
and bad input is a one-line error with exit status 2."""

import json
from pathlib import Path

import pytest

from engram_core.testing.cli import run_cli

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
NAMES = ["budget_sweep", "collapse_debug", "template_oracle", "lora_reader", "contrastive", "overfit_one",
         "reader_as_encoder", "warm_start", "autoencode", "token_select", "gather"]
TRAIN_STAGES = {"collapse_debug": [2], "warm_start": [1, 2], "autoencode": [1, 2], "gather": []}  # training stages ([1] elsewhere)


def shrink(name):
    out = ["data.n_train=48", "data.n_eval=8",
           "stages.0.options={steps = 2, lr = 1e-3, batch_size = 4, modes = [\"summary\"], budgets = [64], lm_weight = 0.5}",
           "metrics.0.max_examples=8", "metrics.1.max_examples=8"]
    for i in TRAIN_STAGES.get(name, [1]):
        out += [f"stages.{i}.steps=2", f"stages.{i}.batch_size=4"]
        if not (name in ("warm_start", "autoencode") and i == 1):  # their first stage does not evaluate
            out.append(f"stages.{i}.eval_every=0")
    return out


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
    if name == "gather":  # the no-training baseline: teacher-forced and greedy scores of every mode
        assert {f"{s}/{m}_b{b}" for s in ("acc", "greedy") for m in ("latent", "oracle_slots") for b in (64, 96, 128)} <= set(final)
        assert final["memory/param_update"] == 0.0
    # the pretrained reader was cached by content: a second run loads it
    assert list((tmp_path / "cache" / "qwen-compressor").glob("reader-*.pt"))


@pytest.mark.parametrize(
    "override, expect",
    [
        ("memory.n_slots=0", "memory.n_slots: must be > 0"),
        ("data.budgets=[64, 200]", "data.budgets: budget 200 leaves no whole statement in the removed segment"),
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


@pytest.mark.parametrize("budget", [151, 159])
def test_metric_budget_beyond_the_data_fails_at_validate(budget, tmp_path):
    """A budget that leaves no whole statement removed in some episode (here above 150: 160
    tokens of context, statements of 10) used to fail only at the first evaluation, after
    reader pretraining; `engram validate` says it now, in one line."""
    r = run_cli("validate", RECIPES / "budget_sweep.toml", "data.n_train=48", "data.n_eval=8",
                f"metrics.0.budgets=[64, {budget}]", tool="engram", plugins="qwen-compressor",
                env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.strip()]
    assert "budget_sweep.toml" in line and "metrics.0.budgets" in line and "budgets up to 150" in line


@pytest.mark.parametrize("budget", [151, 159])
def test_data_budget_beyond_the_prompt_fails_at_validate_without_generating(budget, tmp_path):
    r = run_cli("validate", RECIPES / "budget_sweep.toml", f"data.budgets=[64, {budget}]", tool="engram",
                plugins="qwen-compressor", env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.strip()]
    assert "data.budgets" in line and "the largest budget is 150" in line
    assert not (tmp_path / "cache" / "qwen-compressor").exists()  # dry_spec: no episodes were generated
