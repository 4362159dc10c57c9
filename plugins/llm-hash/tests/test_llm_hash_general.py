"""The general-base recipes (engram:stdlib-lm-cpu as the frozen base, engram_core.lm): Engram,
LoRA and full fine-tuning, each choosing its rate by [select], with held-out code scored with
the memory on and off. A tiny size stands in for stdlib-lm-cpu (a few files, a 300-id BPE, a
16-wide Llama, 6 steps), so the whole path runs in seconds."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from engram_core.lm import pretrain as pretrain_module  # noqa: E402
from engram_core.lm.corpus import CorpusConfig  # noqa: E402
from engram_core.lm.pretrain import PretrainConfig  # noqa: E402
from engram_core.lm.tokens import TokensConfig  # noqa: E402

from .test_llm_hash_recipes import run_recipe, summaries  # noqa: E402

TINY = PretrainConfig(tokens=TokensConfig(vocab_size=300, corpus=CorpusConfig(max_files=6)), hidden=16, layers=2, heads=2,
                      kv_heads=1, intermediate=32, context=32, steps=6, batch_size=4, warmup_steps=2, eval_every=3, eval_windows=4)


@pytest.fixture
def tiny_general_lm(tmp_path, monkeypatch):
    monkeypatch.setitem(pretrain_module.SIZES, "stdlib-lm-cpu", TINY)
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))


def _small(raw):
    if isinstance(raw.get("memory"), dict):
        raw["memory"]["memory_size"] = 4096
    key = next(iter(raw["sweep"]))
    raw["sweep"] = {key: raw["sweep"][key][:2]}
    raw["select"]["then"] = {"run.seed": [0, 1]}
    for m in raw["metrics"]:
        if m["type"] == "perplexity":  # shrink() gave every metric exact_match's key
            m.pop("max_examples")
            m["max_windows"] = 4


@pytest.mark.parametrize("name,seen_stage", [("general_exact_match", "engram_seen"), ("general_exact_match_lora", "lora_seen"),
                                             ("general_exact_match_full", "full_seen")])
def test_general_base_recipes_choose_then_run_seeds(tmp_path, tiny_general_lm, name, seen_stage):
    code, raw = run_recipe(tmp_path, name, _small)
    assert code == 0
    assert raw["head"]["model_dir"] == raw["data"]["tokenizer"] == "engram:stdlib-lm-cpu"
    selection = json.loads(next((tmp_path / "runs" / name).rglob("selection.json")).read_text())
    assert selection["metric"] == f"{seen_stage}:eval/exact_match" and len(selection["values"]) == 2
    done = [s for s in summaries(tmp_path, name) if s.get("status") == "completed"]
    assert len(done) == 3  # two grid points, then the winner again with seed 1
    stages = done[-1]["stages"]
    base, after = stages["baseline_seen"], stages[seen_stage]
    assert base["corpus/ppl"] > 1 and after["corpus/ppl"] > 1 and "unseen/exact_match" in after
    if name == "general_exact_match":  # the memory is on: the same held-out tokens without it, paired
        assert after["corpus/ppl_no_memory"] == pytest.approx(base["corpus/ppl"], rel=1e-4)
        assert 0.0 <= after["corpus/kept"] <= 1.0
        assert "corpus/kept" not in stages["knockout_seen"]
    else:
        assert "corpus/kept" not in after


@pytest.mark.parametrize("name", ["general_code_completion", "general_code_completion_full", "general_code_completion_lora"])
def test_code_completion_recipes_choose_on_val(tmp_path, tiny_general_lm, name):
    def edit(raw):
        _small(raw)
        raw["data"] = {"type": "stdlib_text", "model": "engram:stdlib-lm-cpu", "max_windows": 4}  # shrink() wrote long_recall's keys

    code, raw = run_recipe(tmp_path, name, edit)
    assert code == 0 and raw["data"]["type"] == "stdlib_text"
    selection = json.loads(next((tmp_path / "runs" / name).rglob("selection.json")).read_text())
    assert selection["metric"] == "val:eval/ppl" and selection["mode"] == "min"
    done = [s for s in summaries(tmp_path, name) if s.get("status") == "completed"]
    test = done[-1]["stages"]["test"]
    assert test["eval/ppl"] > 1 and ("eval/ppl_no_memory" in test) == (name == "general_code_completion")
