"""Unseen keys beside seen ones (issue 30): the held-out split the exact-match recipes
score is disjoint from every fact a stage trains on, the metric scores it under its own
tag group whatever split the stage evaluates, and adding it leaves the seen numbers of a
run exactly as they were."""

import json
import math
from pathlib import Path

import pytest
from engram_llm_hash.data import ExactMatchConfig, ExactMatchDataset
from engram_llm_hash.metrics import ExactMatchMetric, ExactMatchMetricConfig
from llm_hash_helpers import tiny_model
from test_llm_hash_recipes import RECIPES, run_recipe, summaries

from engram_core.cli import run_main
from engram_core.components import BuildContext, EvalContext
from engram_core.config import ConfigError
from engram_core.recipe.extends import load_tree
from engram_core.tools.report import load_scalars


def _recipe_data(name: str, cache) -> ExactMatchDataset:
    raw, _ = load_tree(RECIPES / f"{name}.toml")
    cfg = {k: v for k, v in raw["data"].items() if k != "type"}
    return ExactMatchDataset(ExactMatchConfig(**cfg), BuildContext(cache_dir=cache))


def _keys(data: ExactMatchDataset, split: str) -> set[str]:
    return {e.prompt for e in data.examples(split)}


@pytest.mark.parametrize("name, n_unseen", [("kv_memorisation", 30), ("exact_match", None)])
def test_the_unseen_split_is_disjoint_from_every_trained_fact(tmp_path, name, n_unseen):
    data = _recipe_data(name, tmp_path)
    unseen = _keys(data, "test")
    assert unseen and (n_unseen is None or len(unseen) == n_unseen)
    for split in ("pretrain", "train", "seen", "valid"):  # the base's facts, the memory's, and what a user tunes on
        assert not unseen & _keys(data, split), split
    # the recipes' unseen metric scores exactly this split
    raw, _ = load_tree(RECIPES / f"{name}.toml")
    assert {"type": "exact_match", "split": "test", "prefix": "unseen"} in raw["metrics"]


def _evaluate(metric, model, data, stage_split):
    metric.bind(EvalContext(model, data, stage_split, 0, "s", None, 8, None))
    metric.reset()
    for batch in metric.batches(data, stage_split, 8):
        metric.update(model, batch)
    return metric.compute()


def test_the_metric_scores_its_own_split_under_its_prefix(tmp_path):
    data, head, _, model = tiny_model(tmp_path)
    model.eval()
    build = BuildContext(spec=data.spec, dataset=data)
    unseen = ExactMatchMetric(ExactMatchMetricConfig(split="test", prefix="unseen"), build)
    out = _evaluate(unseen, model, data, "seen")  # the stage evaluates `seen`; the metric scores `test`
    cats = sorted({e.category for e in data.examples("test")})
    assert set(out) == {"unseen/exact_match", "unseen/gen_ms_per_token", "unseen/gen_ms_per_example",
                        *(f"unseen/exact_match_{c}" for c in cats)}
    assert sum(unseen.counts.values()) == len(data.examples("test")) != len(data.examples("seen"))
    assert all(math.isfinite(v) for v in out.values())
    # the default entry is as before: bare names (logged as eval/...), on the stage's split
    seen = ExactMatchMetric(ExactMatchMetricConfig(), build)
    assert "exact_match" in _evaluate(seen, model, data, "seen")
    assert sum(seen.counts.values()) == len(data.examples("seen"))


@pytest.mark.parametrize("key, value, message", [("split", "tset", "has no split 'tset'"), ("prefix", "un/seen", "tag group")])
def test_a_bad_split_or_prefix_is_a_config_error(tmp_path, key, value, message):
    data, *_ = tiny_model(tmp_path)
    with pytest.raises(ConfigError, match=message):
        ExactMatchMetric(ExactMatchMetricConfig(**{key: value}), BuildContext(spec=data.spec, dataset=data))


def test_a_misspelt_split_through_engram_run_is_one_line_exit_2(tmp_path, capsys):
    code = run_main([str(RECIPES / "exact_match.toml"), "metrics.1.split=tset", "--dry-run"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "tset" in err[0], err


def _seen_numbers(summary: dict) -> dict[str, float]:
    """Every number of a run but the unseen ones and the timings: each evaluation's (those
    inside training too) and every logged training loss."""
    out = {}
    run_dir = Path(summary["run_dir"])
    for rec in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        for tag, v in rec["metrics"].items():
            if not tag.startswith("unseen/") and "gen_ms" not in tag:
                out[f"{rec['stage']}@{rec['step']}:{tag}"] = v
    for tag, points in load_scalars(run_dir).items():
        if tag.startswith("train/") and tag != "train/lr":
            out.update({f"{tag}@{step}": v for step, v in points})
    return out


def test_the_seen_numbers_of_a_tiny_run_are_unchanged(tmp_path, monkeypatch):
    """kv_memorisation as shipped against the same recipe with its one metric before this
    change: every seen number, loss and memory statistic (slot use, collisions, gate)
    identical — the unseen keys' forwards leave the memory's telemetry alone."""

    def tiny(raw):
        raw.pop("sweep")
        raw["stages"][2].update(steps=12, eval_every=4)  # the unseen metric runs mid-training too
        for st in raw["stages"][:3:2]:
            st["lr"] = 1e-2

    def before(raw):
        tiny(raw)
        raw["metrics"] = [m for m in raw["metrics"] if "prefix" not in m]

    runs = {}
    for label, edit in (("before", before), ("after", tiny)):
        (tmp_path / label).mkdir()
        monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / label / "cache"))
        code, _ = run_recipe(tmp_path / label, "kv_memorisation", edit)
        assert code == 0
        runs[label] = summaries(tmp_path / label, "kv_memorisation")[-1]
    after = runs["after"]
    assert "unseen/exact_match" in after["final"] and "unseen/exact_match" in after["stages"]["baseline_seen"]
    assert not any(t.startswith("unseen/") for t in runs["before"]["final"])
    seen_before, seen_after = _seen_numbers(runs["before"]), _seen_numbers(runs["after"])
    assert seen_after == seen_before, json.dumps({k: (seen_before.get(k), seen_after.get(k)) for k in seen_after if seen_before.get(k) != seen_after.get(k)})
    mid_training = [k for k in seen_after if k.startswith("train_engram@") and k.endswith(":memory/gate_mean")]
    assert len(mid_training) == 3  # evaluations inside training compared too (pretraining's 2 steps, then every 4)
    assert any(k.startswith("train/ce@") for k in seen_after)
