"""engram_core.lm: the general LM made here, its corpus, tokenizer, cache and perplexities.

A tiny size (a few standard-library files, a 300-id BPE, a 16-wide model, 6 steps) stands
in for stdlib-lm-cpu so the whole path — corpus, tokenizer, pretraining, `save_pretrained`,
the cache, `from_pretrained`, the recipe components — runs in seconds."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from engram_core.components import BuildContext, EvalContext, Model  # noqa: E402
from engram_core.errors import ConfigError  # noqa: E402
from engram_core.lm import pretrain as pretrain_module  # noqa: E402
from engram_core.lm import resolve_model  # noqa: E402
from engram_core.lm.components import (  # noqa: E402
    NgramPerplexity,
    NgramPerplexityConfig,
    Perplexity,
    PerplexityConfig,
    PretrainedLMConfig,
    PretrainedLMHead,
    PretrainReport,
    PretrainReportConfig,
    StdlibTextConfig,
    StdlibTextDataset,
)
from engram_core.lm.corpus import CorpusConfig, corpus_files, split_of  # noqa: E402
from engram_core.lm.pretrain import PretrainConfig  # noqa: E402
from engram_core.lm.tokens import TokensConfig, train_tokenizer  # noqa: E402

TINY = PretrainConfig(tokens=TokensConfig(vocab_size=300, corpus=CorpusConfig(max_files=6)), hidden=16, layers=1, heads=2,
                      kv_heads=1, intermediate=32, context=32, steps=6, batch_size=4, warmup_steps=2, eval_every=3, eval_windows=4)


@pytest.fixture
def tiny_size(monkeypatch):
    monkeypatch.setitem(pretrain_module.SIZES, "stdlib-lm-tiny", TINY)
    return "engram:stdlib-lm-tiny"


def test_splits_are_by_whole_file_and_disjoint():
    files = corpus_files(CorpusConfig(max_files=50))
    names = [set(p.as_posix() for p in files[s]) for s in ("train", "val", "test")]
    assert all(names) and not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert split_of("json/decoder.py") == split_of("json/decoder.py")
    shares = [split_of(f"pkg/mod{i}.py") for i in range(2000)]
    assert 0.85 < shares.count("train") / 2000 < 0.95  # 90 / 5 / 5 by hash


def test_bytes_per_token_add_up_to_the_text():
    from engram_core.lm.tokens import bytes_per_token

    text = "def f(x):\n    return x + 1  # ünïcode ✓\n"
    tok = train_tokenizer([text * 20], 280)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert int(bytes_per_token(tok)[torch.tensor(ids)].sum()) == len(text.encode("utf-8"))


def test_pretrained_model_is_cached_and_loads_like_a_checkpoint(tmp_path, tiny_size, capsys):
    folder = resolve_model(tiny_size, tmp_path, "cpu")
    out = capsys.readouterr().out
    assert "miss lm/general_lm" in out and "pretrain: step 6/6" in out
    assert resolve_model(tiny_size, tmp_path, "cpu") == folder  # a hit: nothing trains again
    assert "hit lm/general_lm" in capsys.readouterr().out and "pretrain:" not in capsys.readouterr().out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tok) == 300
    report = (folder / "pretrain_report.json").read_text()
    assert '"curve"' in report and '"tokens_per_s"' in report
    # another seed is another artefact
    pretrain_module.SIZES["stdlib-lm-tiny"] = pretrain_module.attrs.evolve(TINY, seed=1)
    assert resolve_model(tiny_size, tmp_path, "cpu") != folder


def test_pretraining_keeps_the_weights_of_the_lowest_validation_loss(tmp_path, monkeypatch):
    """Early stopping on validation: with the validation loss lowest at the middle evaluation
    (step 3 of 6), the returned model holds the weights it had at that evaluation, and the
    report names that step; when the last evaluation is the lowest, nothing is reloaded."""
    from engram_core.lm.tokens import load_tokens

    corpus = load_tokens(TINY.tokens, tmp_path)
    for losses, kept in (([5.0, 3.0, 4.0], 3), ([5.0, 4.0, 3.0], 6)):
        seen = []

        def scripted_loss(model, stream, cfg, device, autocast, seen=seen, losses=losses):
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return losses[len(seen) - 1]

        monkeypatch.setattr(pretrain_module, "mean_loss", scripted_loss)
        model, report = pretrain_module.pretrain(TINY, corpus, torch.device("cpu"), log=lambda *_: None)
        assert [r["step"] for r in report["curve"]] == [0, 3, 6] and report["best_val_step"] == kept
        expected = seen[[0, 3, 6].index(kept)]
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
        assert not all(torch.equal(a, b) for a, b in zip(seen[1].values(), seen[2].values()))  # training moved them


def test_unknown_engram_model_is_one_line():
    with pytest.raises(ConfigError, match="stdlib-lm-cpu"):
        resolve_model("engram:gpt-5", "/tmp/unused")


def _evaluate(metric, model, dataset, split, batch_size=8):
    metric.reset()
    metric.bind(EvalContext(model=model, dataset=dataset, split=split, step=0, stage="t", objective=None, batch_size=batch_size,
                            device=torch.device("cpu")))
    with torch.no_grad():
        for batch in metric.batches(dataset, split, batch_size):
            metric.update(model, batch)
    return metric.compute()


class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids, mask=None):
        return torch.zeros(*ids.shape, self.vocab) + self.w


def test_perplexity_of_a_uniform_model_is_the_vocabulary(tmp_path, tiny_size):
    data = StdlibTextDataset(StdlibTextConfig(model=tiny_size, max_windows=10), BuildContext(cache_dir=tmp_path))
    m = _evaluate(Perplexity(PerplexityConfig(), BuildContext()), Model(Uniform(300)), data, "test")
    assert m["ppl"] == pytest.approx(300, rel=1e-5)
    n_tokens = 10 * 32
    total_bytes = float(sum(data.token_bytes[b["labels"][:, 1:]].sum() for b in data.eval_batches("test", 8)))
    assert m["ppl_byte"] == pytest.approx(math.exp(n_tokens * math.log(300) / total_bytes), rel=1e-5)


def test_windows_score_every_token_once(tmp_path, tiny_size):
    data = StdlibTextDataset(StdlibTextConfig(model=tiny_size), BuildContext(cache_dir=tmp_path))
    stream = data.streams["val"]
    targets = torch.cat([b["labels"][:, 1:].reshape(-1) for b in data.eval_batches("val", 5)])
    n = (len(stream) - 1) // 32 * 32
    assert torch.equal(targets, stream[1:n + 1])


def test_ngram_baselines_tune_on_val_and_bigram_beats_unigram(tmp_path, tiny_size):
    data = StdlibTextDataset(StdlibTextConfig(model=tiny_size), BuildContext(cache_dir=tmp_path))
    m = _evaluate(NgramPerplexity(NgramPerplexityConfig(), BuildContext()), Model(Uniform(300)), data, "test")
    assert m["bigram_ppl"] < m["unigram_ppl"] < 300
    assert m["unigram_k"] in NgramPerplexityConfig().unigram_k and m["bigram_lambda"] in NgramPerplexityConfig().bigram_lambda


def test_pretrained_head_beats_its_untrained_self(tmp_path, tiny_size):
    build = BuildContext(cache_dir=tmp_path, device=torch.device("cpu"))
    data = StdlibTextDataset(StdlibTextConfig(model=tiny_size, max_windows=16), build)
    head = PretrainedLMHead(PretrainedLMConfig(model_dir=tiny_size), build)
    trained = _evaluate(Perplexity(PerplexityConfig(), build), Model(head), data, "test")
    # a check (dry run) with nothing cached builds the shapes, randomly initialised, and pretrains nothing
    fresh = PretrainedLMHead(PretrainedLMConfig(model_dir=tiny_size), BuildContext(cache_dir=tmp_path / "empty", dry_run=True))
    assert not (tmp_path / "empty").exists()
    untrained = _evaluate(Perplexity(PerplexityConfig(), build), Model(fresh), data, "test")
    assert trained["ppl"] < untrained["ppl"]
    report = _evaluate(PretrainReport(PretrainReportConfig(), build), Model(head), data, "test")
    assert report["pretrain/parameters"] == sum(p.numel() for p in head.parameters()) and report["pretrain/tokens_per_s"] > 0
    assert "pretrain/mfu" not in report  # CPU: no peak to compare with
    curve = head.pretrain_report["curve"]
    best = min(curve, key=lambda row: row["val_loss"])
    assert report["pretrain/best_val_loss"] == best["val_loss"] <= report["pretrain/val_loss"] == curve[-1]["val_loss"]
    assert report["pretrain/best_val_step"] == best["step"] and report["pretrain/steps"] == curve[-1]["step"] > 0
    assert _evaluate(PretrainReport(PretrainReportConfig(), build), Model(fresh), data, "test") == {}


class Switch(torch.nn.Module):
    """A memory whose only effect is to make every prediction uniform."""

    def __init__(self):
        super().__init__()
        self.enabled = True


class WithMemory(torch.nn.Module):
    def __init__(self, head, memory):
        super().__init__()
        self.head, self.memory = head, memory

    def forward(self, ids, mask=None):
        logits = self.head(ids, mask)
        return torch.zeros_like(logits) if self.memory.enabled else logits


def test_corpus_perplexity_pairs_memory_on_and_off(tmp_path, tiny_size):
    build = BuildContext(cache_dir=tmp_path, device=torch.device("cpu"))
    head = PretrainedLMHead(PretrainedLMConfig(model_dir=tiny_size), build)
    metric = Perplexity(PerplexityConfig(corpus=tiny_size, corpus_split="val", max_windows=8), build)
    m = _evaluate(metric, WithMemory(head, Switch()), dataset=None, split="seen")  # the recipe's data is not read
    assert m["corpus/ppl"] == pytest.approx(300, rel=1e-4) and m["corpus/ppl_no_memory"] < 300
    assert m["corpus/acc_no_memory"] > 0 and m["corpus/kept"] < 1.0


def test_missing_extra_is_one_line(monkeypatch):
    import importlib.util

    from engram_core.lm import require_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tokenizers" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs tokenizers: pip install 'engram-core\[lm\]'"):
        require_extra("model_dir")


def test_engram_lm_unknown_name_is_one_line_exit_2():
    from engram_core.testing.cli import run_cli

    r = run_cli("lm", "pretrain", "gpt-5", tool="engram", plugins=None)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "engram:stdlib-lm-cpu" in lines[0], lines


def test_engram_lm_pretrain_prints_the_kept_weights(tmp_path, tiny_size, monkeypatch, capsys):
    """`engram lm pretrain NAME` reports the validation loss of the weights it saved (the
    lowest) beside the last step's."""
    import argparse

    from rich.console import Console

    from engram_core.lm import plugin

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path))
    losses = iter([5.0, 3.0, 4.0])
    monkeypatch.setattr(pretrain_module, "mean_loss", lambda *a, **k: next(losses))
    args = argparse.Namespace(name="stdlib-lm-tiny", lm_cmd="pretrain", device="cpu", json=False)
    assert plugin._lm(args, Console(width=200)) == 0
    out = capsys.readouterr().out
    assert "val loss 3.000 at step 3, the weights kept (the last step's: 4.000 at step 6)" in out, out
