"""Issue 30: the global-mixing baseline without memory (`trunk = "transformer"`) and the two
knock-outs that each remove one path of the read into the logits (`knockout = "read_state"`
keeps the vote, `knockout = "vote"` keeps the read in the state)."""

import json
import tomllib
from pathlib import Path

import pytest
import torch
from engram_deq_hrr.data import NeedleConfig, NeedleDataset
from engram_deq_hrr.head import DEQClassifier, DEQClassifierConfig
from engram_deq_hrr.memories import HRRMemory, HRRMemoryConfig
from engram_deq_hrr.metrics import DEQHRRAccuracy, DEQHRRAccuracyConfig

from engram_core.cli import run_main
from engram_core.components import BuildContext, Model
from engram_core.config import ConfigError

ROOT = Path(__file__).resolve().parents[3]
TINY = ["data.seq_len=24", "data.n_pairs=2", "data.n_train=64", "data.n_eval=32", "data.eval_lengths=[48]",
        "head.hidden=16", "head.embed=16", "stages.0.steps=6", "stages.0.eval_every=3", "stages.0.checkpoint_every=6",
        "stages.0.batch_size=8"]


def _build(cache, memory=True, **head_kw):
    ds = NeedleDataset(NeedleConfig(seq_len=24, n_pairs=2, n_train=16, n_eval=8), BuildContext(cache_dir=cache))
    build = BuildContext(spec=ds.spec, seed=0, cache_dir=cache)
    head = DEQClassifier(DEQClassifierConfig(hidden=16, embed=16, **head_kw), build)
    build.head = head
    mem = HRRMemory(HRRMemoryConfig(dim=32), build) if memory else None
    model = Model(head, mem, "trace" if memory else None).eval()
    return ds, head, mem, model


def _logits(head, batch, **kw):
    with torch.no_grad():
        return head.forward_detailed(batch, **kw)


def test_each_knock_out_removes_exactly_its_path(tmp_path):
    ds, head, mem, _ = _build(tmp_path)
    batch = ds.sample("eval", 6, torch.Generator().manual_seed(0))
    full = _logits(head, batch)
    vote = full["memory"]["scores"] / mem.cfg.cleanup_temp
    without_state = _logits(head, batch, knockout="read_state")["logits"]
    without_vote = _logits(head, batch, knockout="vote")["logits"]
    mem.enabled = False
    no_memory = _logits(head, batch)["logits"]
    mem.enabled = True
    # the vote is added straight to the logits: dropping it subtracts exactly it
    assert torch.allclose(without_vote, full["logits"] - vote, atol=1e-5)
    # dropping the read from the state leaves the memory-free classifier plus the vote
    assert torch.allclose(without_state, no_memory + vote, atol=1e-5)
    # both paths carry something here, so each knock-out changes the logits
    assert not torch.allclose(without_state, full["logits"], atol=1e-3)
    assert not torch.allclose(without_vote, full["logits"], atol=1e-3)


def test_a_large_state_path_moves_only_what_keeps_it(tmp_path):
    ds, head, mem, _ = _build(tmp_path)
    batch = ds.sample("eval", 6, torch.Generator().manual_seed(1))
    before = {k: _logits(head, batch, knockout=k)["logits"] for k in (None, "read_state", "vote")}
    with torch.no_grad():
        mem.out_proj.weight.mul_(1e3)  # the read's contribution to the state, made large
    after = {k: _logits(head, batch, knockout=k)["logits"] for k in (None, "read_state", "vote")}
    assert torch.equal(after["read_state"], before["read_state"])  # that path is gone
    assert not torch.allclose(after["vote"], before["vote"], atol=1e-2)
    assert not torch.allclose(after[None], before[None], atol=1e-2)


def test_with_the_state_path_closed_only_the_vote_knock_out_matters(tmp_path):
    """A closed read gate zeroes the read's state path: knocking that path out changes
    nothing, knocking the vote out leaves the model without memory."""
    ds, head, mem, _ = _build(tmp_path)
    with torch.no_grad():
        mem.read_gate.bias.fill_(-80.0)
    batch = ds.sample("eval", 6, torch.Generator().manual_seed(2))
    full = _logits(head, batch)["logits"]
    assert torch.allclose(_logits(head, batch, knockout="read_state")["logits"], full, atol=1e-6)
    mem.enabled = False
    no_memory = _logits(head, batch)["logits"]
    mem.enabled = True
    assert torch.allclose(_logits(head, batch, knockout="vote")["logits"], no_memory, atol=1e-6)
    assert not torch.allclose(full, no_memory, atol=1e-3)


def test_defaults_and_an_unknown_knock_out(tmp_path):
    ds, head, _, _ = _build(tmp_path)
    batch = ds.sample("eval", 4, torch.Generator().manual_seed(3))
    assert torch.equal(_logits(head, batch)["logits"], _logits(head, batch, knockout=None)["logits"])
    with pytest.raises(ValueError, match="knockout"):
        head.forward_detailed(batch, knockout="trace")
    with pytest.raises(ConfigError, match="unknown knock-out 'trace'"):
        DEQHRRAccuracyConfig(knockouts=("vote", "trace"))


def _metric(model, ds, **kw):
    metric = DEQHRRAccuracy(DEQHRRAccuracyConfig(majority=False, **kw), BuildContext(spec=ds.spec))
    metric.reset()
    for b in ds.eval_batches("eval", 4):
        metric.update(model, b)
    return metric.compute()


def test_the_metric_reports_each_knock_out_and_nothing_by_default(tmp_path):
    ds, head, _, model = _build(tmp_path)
    plain = _metric(model, ds)
    assert not any(k.startswith("acc_without") for k in plain)
    out = _metric(model, ds, knockouts=("read_state", "vote"))
    assert out["acc"] == plain["acc"]
    for knockout in ("read_state", "vote"):
        hits = total = 0
        for b in ds.eval_batches("eval", 4):
            hits += int((_logits(head, b, knockout=knockout)["logits"].argmax(-1) == b["label"]).sum())
            total += b["label"].shape[0]
        assert out[f"acc_without_{knockout}"] == pytest.approx(hits / total)


def test_transformer_trunk_mixes_globally_and_causally(tmp_path):
    ds, head, _, model = _build(tmp_path, memory=False, trunk="transformer")
    assert model.memory is None and not head.memory_active
    tokens = ds.sample("train", 3, torch.Generator().manual_seed(4))["tokens"]
    z = head.equilibrium(tokens)
    later = tokens.clone()
    later[:, -1] = (later[:, -1] + 1) % ds.spec.vocab_size
    assert torch.allclose(head.equilibrium(later)[:, :-1], z[:, :-1], atol=1e-6)  # causal
    earlier = tokens.clone()
    earlier[:, 0] = (earlier[:, 0] + 1) % ds.spec.vocab_size
    assert not torch.allclose(head.equilibrium(earlier)[:, -1], z[:, -1], atol=1e-4)  # the first token reaches the last
    # the transformer's weights are a function of the build seed alone (not of the global RNG)
    torch.manual_seed(123)
    _, head2, _, _ = _build(tmp_path, memory=False, trunk="transformer")
    pairs = zip(head.transformer.state_dict().values(), head2.transformer.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ConfigError, match="must divide hidden"):
        DEQClassifierConfig(hidden=16, trunk="transformer", transformer_heads=3)


def test_transformer_baseline_trains_without_memory_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    rc = run_main([str(ROOT / "recipes/needle_len256.toml"), *TINY, "head.trunk=transformer", "memory=none",
                   "metrics.0.knockouts=[\"read_state\", \"vote\"]", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    run = sorted(p for p in (out / "needle_len256").iterdir() if p.is_dir())[-1]
    summary = json.dumps(json.loads((run / "summary.json").read_text()))
    assert "eval/acc@48" in summary and "eval/best_acc" in summary
    assert "memory/raw_read_cos" not in summary and "acc_without" not in summary  # no memory: nothing to knock out
    ran = tomllib.loads((run / "recipe.toml").read_text())
    assert "memory" not in ran and ran["head"]["trunk"] == "transformer"
