"""Every recipe of this plugin runs end to end through engram-run (shrunk to a few
steps), the HF head runs through a recipe, and bad input is a one-line error, exit 2."""

import json
from pathlib import Path

import pytest
import tomli_w

from engram_core.cli import run_main
from engram_core.recipe.extends import load_tree

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
NAMES = ["exact_match", "four_way", "long_recall", "kv_memorisation", "hybrid", "prepopulate"]


def _shrink_stage(st: dict) -> None:
    if "steps" in st:
        st["steps"] = 2
        st["batch_size"] = 4
        st.pop("eval_every", None)
        st.pop("warmup_steps", None)


def shrink(raw: dict, out: Path) -> dict:
    raw.setdefault("run", {})["out_dir"] = str(out)
    data = raw["data"]
    if data["type"] == "exact_match":
        data["n_synthetic"] = 20
    else:
        data.update(n_train=20, n_eval=6, max_distraction=120, buckets=[50, 100, 200])
    if raw["head"]["type"] == "tiny_causal_lm":
        raw["head"].update(dim=32, n_layers=2, n_heads=2)
    for st in raw["stages"]:
        _shrink_stage(st)
    for m in raw.get("metrics", []):
        m["max_examples"] = 6
    for key, values in raw.get("sweep", {}).items():
        for v in values:
            if isinstance(v, dict) and key.startswith("stages"):
                _shrink_stage(v)
    return raw


def run_recipe(tmp_path, name, edit=None, *overrides):
    raw, _ = load_tree(RECIPES / f"{name}.toml")  # `extends` merged: a recipe that stands alone in tmp_path
    raw = shrink(raw, tmp_path / "runs")
    if edit:
        edit(raw)
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return run_main([str(path), *overrides, "--quiet"]), raw


def summaries(tmp_path, name):
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "runs" / name).rglob("summary.json"))]


@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs(tmp_path, name, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    code, raw = run_recipe(tmp_path, name)
    assert code == 0
    sums = summaries(tmp_path, name)
    points = 1
    for values in raw.get("sweep", {}).values():
        points *= len(values)
    assert len(sums) == points and all(s["status"] == "completed" for s in sums)
    final = sums[-1]["final"]
    assert "eval/exact_match" in final
    if raw.get("memory") and name not in ("long_recall",):
        stages = sums[-1]["stages"]
        assert any("memory/slot_utilisation" in v for v in stages.values())
    if name == "exact_match":  # TensorBoard holds the memory's scalars and histograms
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        ea = EventAccumulator(sums[-1]["run_dir"], size_guidance={"histograms": 0, "scalars": 0})
        ea.Reload()
        tags = ea.Tags()
        assert {"memory/gate", "memory/slot_usage"} <= set(tags["histograms"])
        assert {"memory/gate_mean", "memory/collision_rate", "eval/exact_match_port"} <= set(tags["scalars"])


def test_hf_head_through_a_recipe(tmp_path, monkeypatch):
    """exact_match with a tiny random Llama (byte vocabulary) from a local directory."""
    transformers = pytest.importorskip("transformers")
    import torch

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model_dir = tmp_path / "tiny-llama"
    transformers.AutoModelForCausalLM.from_config(conf).save_pretrained(model_dir)

    def edit(raw):
        raw["head"] = {"type": "hf_causal_lm", "model_dir": str(model_dir), "lora_r": 2}
        raw["memory"]["layers"] = [1]
        raw["stages"][0]["train"] = ["head.*lora_*"]
        raw["stages"][0].pop("freeze", None)

    code, _ = run_recipe(tmp_path, "exact_match", edit)
    assert code == 0
    s = summaries(tmp_path, "exact_match")[-1]
    assert s["status"] == "completed" and "memory/gate_mean" in s["stages"]["train_engram"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("memory.layers=[7]", "memory.layers: layer index 7 out of range: the model has 4 layers"),
        ("memory.memory_size=0", "memory.memory_size: must be > 0"),
        ('head={type="hf_causal_lm", model_dir="/nonexistent/model"}', "head.model_dir: model directory does not exist"),
        ('data.path="/nonexistent/facts.jsonl"', "data.path: data file does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, override, message):
    code = run_main([str(RECIPES / "exact_match.toml"), override, "--dry-run"])
    if code == 0:  # the dry run validates configs only; building happens at run time
        code = run_main([str(RECIPES / "exact_match.toml"), override, f"run.out_dir={json.dumps(str(tmp_path))}", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err


def test_data_file_missing_field_exit_2(tmp_path, capsys):
    f = tmp_path / "facts.jsonl"
    f.write_text('{"input": "A:x=", "split": "train"}\n')
    code = run_main([str(RECIPES / "exact_match.toml"), f"data.path={json.dumps(str(f))}", f"run.out_dir={json.dumps(str(tmp_path))}", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "missing field 'output'" in err[0], err


def test_sparse_table_with_sparse_adam_through_the_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))

    def edit(raw):
        raw.pop("sweep")
        raw["memory"]["sparse"] = True
        raw["stages"][2]["param_groups"] = [{"params": ["memory.*.table.weight"], "lr": 1e-2, "optimizer": "sparse_adam"}]

    code, _ = run_recipe(tmp_path, "kv_memorisation", edit)
    assert code == 0
    s = summaries(tmp_path, "kv_memorisation")[-1]
    assert s["status"] == "completed"


@pytest.mark.parametrize("name", ["hf_exact_match", "hf_exact_match_canonical"])
def test_hf_exact_match_recipes(tmp_path, monkeypatch, name):
    """The recipes on a small random Llama that the test builds and saves (CPU): the base
    stays frozen, the tables train in their own group; the canonical variant hashes the
    ids of the model's trained byte-level BPE and reports the vocabulary compression."""
    pytest.importorskip("transformers")
    import torch
    from engram_llm_hash.tiny_hf import save_tiny_causal_lm

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    canonical = name.endswith("canonical")
    model_dir = tmp_path / "tiny"
    save_tiny_causal_lm(model_dir, "llama", hidden=32, tokenizer="bpe" if canonical else "byte")

    def edit(raw):
        raw["head"]["model_dir"] = str(model_dir)
        if canonical:
            raw["data"]["tokenizer"] = str(model_dir)

    code, raw = run_recipe(tmp_path, name, edit)
    assert code == 0
    assert raw["run"]["precision"] == "bf16" and raw["stages"][1]["train"] == ["memory.*"]
    s = summaries(tmp_path, name)[-1]
    assert s["status"] == "completed"
    train = s["stages"]["train_engram"]
    assert "memory/slot_utilisation" in train and "eval/exact_match" in s["stages"]["engram_test"]
    if canonical:
        assert train["memory/vocab_compression"] > 1.0
    # the base model's weights are those the directory holds: frozen through the run
    ckpt = sorted(Path(s["run_dir"]).rglob("*.pt"))
    assert ckpt
    if ckpt:
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
        state = torch.load(ckpt[-1], weights_only=True)
        state = state.get("model", state)
        heads = {k.split("head.model.", 1)[1]: v for k, v in state.items() if isinstance(v, torch.Tensor) and k.startswith("head.model.")}
        assert heads and all(torch.equal(v, base[k]) for k, v in heads.items() if k in base)
