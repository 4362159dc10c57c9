"""exact_match and long_recall data sets, the completion objective and the metric."""

import json

import pytest
import torch
from engram_llm_hash.data import CATEGORIES, ExactMatchConfig, ExactMatchDataset, LongRecallConfig, LongRecallDataset
from engram_llm_hash.heads import TinyCausalLMConfig, TinyCausalLMHead
from engram_llm_hash.metrics import ExactMatchMetric, ExactMatchMetricConfig
from engram_llm_hash.objectives import CompletionCE, CompletionCEConfig

from engram_core.components import BuildContext, EvalContext, Model
from engram_core.config import ConfigError


def keys(exs):
    return {e.prompt for e in exs}


def test_exact_match_is_deterministic_and_split_by_key(tmp_path):
    a = ExactMatchDataset(ExactMatchConfig(), BuildContext(cache_dir=tmp_path / "a"))
    b = ExactMatchDataset(ExactMatchConfig(), BuildContext(cache_dir=tmp_path / "b"))
    cached = ExactMatchDataset(ExactMatchConfig(), BuildContext(cache_dir=tmp_path / "a"))
    assert list((tmp_path / "a" / "llm-hash").glob("exact_match-*.jsonl"))
    for split in ("pretrain", "train", "valid", "test", "seen"):
        assert a.examples(split) == b.examples(split) == cached.examples(split)
    parts = [keys(a.examples(s)) for s in ("pretrain", "train", "valid", "test")]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not parts[i] & parts[j]
    assert a.examples("seen") == a.examples("train") == a.examples("eval")
    assert {e.category for e in a.examples("train")} == set(CATEGORIES)
    other = ExactMatchDataset(ExactMatchConfig(seed=1), None)
    assert keys(other.examples("train")) != keys(a.examples("train"))


def test_labels_cover_only_the_completion():
    ds = ExactMatchDataset(ExactMatchConfig(categories=["port"]), None)
    batch = next(ds.eval_batches("train", 4))
    codec = ds.codec
    for i, ex in enumerate(ds.examples("train")[:4]):
        lab = batch["labels"][i]
        kept = lab[lab != -100].tolist()
        assert kept == codec.encode(ex.completion) + [codec.eos_id]
        first = (lab != -100).nonzero()[0].item()
        assert first == len(codec.prompt_ids(ex.prompt))


def test_data_file_missing_field_is_one_line_error(tmp_path):
    f = tmp_path / "facts.jsonl"
    f.write_text(json.dumps({"input": "A:x=", "output": "1", "split": "train"}) + "\n" + json.dumps({"input": "B:y=", "split": "train"}) + "\n")
    with pytest.raises(ConfigError, match=r"path: .*facts.jsonl:2: missing field 'output'"):
        ExactMatchDataset(ExactMatchConfig(path=str(f)), None)
    f.write_text(json.dumps({"input": "A:x=", "output": "1", "split": "train", "category": "mine"}) + "\n")
    ds = ExactMatchDataset(ExactMatchConfig(path=str(f)), None)
    assert ds.examples("seen")[0].category == "mine"
    with pytest.raises(ConfigError, match="does not exist"):
        ExactMatchDataset(ExactMatchConfig(path=str(tmp_path / "nope.jsonl")), None)
    with pytest.raises(ConfigError, match="unknown category"):
        ExactMatchConfig(categories=["capitals"])


def test_long_recall_lengths_and_buckets():
    ds = LongRecallDataset(LongRecallConfig(n_train=50, n_eval=40), None)
    for ex in ds.examples("eval"):
        statement, rest = ex.prompt.split(". ", 1)
        name = statement.split()[3]
        assert ex.prompt.endswith(f"The code for {name} is ")
        assert statement.endswith(ex.completion)
        distraction = rest[: -len(f" The code for {name} is ")]
        assert 50 <= len(distraction) <= 400
    cats = {e.category for e in ds.examples("eval")}
    assert cats == {"d50-100", "d100-200", "d200-400"}
    fixed = LongRecallDataset(LongRecallConfig(n_train=50, n_eval=20, n_pairs=5), None)
    stated = {e.prompt.split(". ", 1)[0] for split in ("train", "eval") for e in fixed.examples(split)}
    assert len(stated) <= 5
    with pytest.raises(ConfigError, match="max_distraction"):
        LongRecallConfig(min_distraction=100, max_distraction=50)


def test_objective_and_metric_on_a_tiny_head():
    ds = ExactMatchDataset(ExactMatchConfig(categories=["port", "http_code"]), None)
    head = TinyCausalLMHead(TinyCausalLMConfig(dim=32, n_layers=1, n_heads=2), BuildContext(spec=ds.spec))
    model = Model(head)
    obj = CompletionCE(CompletionCEConfig(), BuildContext())
    batch = ds.sample("train", 8, torch.Generator().manual_seed(0))
    loss, terms = obj(model, batch)
    assert abs(loss.item() - torch.log(torch.tensor(259.0)).item()) < 1.0  # untrained: ~uniform
    loss.backward()
    metric = ExactMatchMetric(ExactMatchMetricConfig(max_examples=10), BuildContext())
    metric.bind(EvalContext(model, ds, "seen", 0, "s", obj, 4, torch.device("cpu")))
    metric.reset()
    n = 0
    for b in metric.batches(ds, "seen", 4):
        assert (b["prompt_ids"] != ds.codec.pad_id).all()  # grouped by length: never padded
        metric.update(model, b)
        n += len(b["answers"])
    out = metric.compute()
    assert n == 10 and 0.0 <= out["exact_match"] <= 1.0 and out["gen_ms_per_token"] > 0
    # a head that copies the answer scores 1
    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.answers = {tuple(ds.codec.prompt_ids(e.prompt)): e.completion for e in ds.examples("seen")}

        def generate(self, ids, budget, use_cache=True, eos_id=None):
            rows = [ds.codec.encode(self.answers[tuple(r.tolist())]) + [eos_id] for r in ids]
            n = max(map(len, rows))
            return torch.tensor([r + [eos_id] * (n - len(r)) for r in rows])

    oracle = Model(Oracle())
    metric.reset()
    for b in metric.batches(ds, "seen", 4):
        metric.update(oracle, b)
    assert metric.compute()["exact_match"] == 1.0
