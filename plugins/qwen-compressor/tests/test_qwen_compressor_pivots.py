"""The pivots' pieces: overfit-one fits its episode, autoencoding CE, the slot-target warm
start, slot-wise InfoNCE, token selection, and the whole budget sweep on a tiny random
Qwen2 with a tiny tokenizer trained and saved here (no download)."""

import json

import pytest
import torch
import torch.nn.functional as F
from engram_qwen_compressor.memories import TokenSelect, TokenSelectConfig
from engram_qwen_compressor.objectives import (
    CompressorLoss,
    CompressorLossConfig,
    slot_labels,
    slot_regression,
    slot_targets,
    text_ce,
)
from qwen_compressor_helpers import batch, save_tiny_qwen2, small_data, small_model
from test_qwen_compressor_recipes import RECIPES, shrink

from engram_core.testing.cli import run_cli


def test_overfit_one_fits_its_episode():
    """The seed's sanity check: one episode repeated, the memory alone trains, the reader is
    frozen. The reader must read its context: a freshly initialised one (weights of std 0.02)
    passes almost nothing from other positions to the answer, so its weights are drawn at
    std 0.2 here, a stand-in for a pretrained reader (the recipe's reader fits it in ~30 steps)."""
    ds = small_data(budgets=[64])
    model, build = small_model(ds, memory_kw={"n_slots": 16})
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.head.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    model.head.requires_grad_(False)
    obj = CompressorLoss(CompressorLossConfig(overfit_one=True, budgets=[64]), build)
    opt = torch.optim.Adam(model.memory.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        b = obj.sample(ds, "train", 8, g)
        loss, terms = obj(model, b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = float(terms["ce"]) if first is None else first
    assert (b["target_pos"] == b["target_pos"][0]).all()  # one episode, one question
    assert float(terms["acc"]) == 1.0 and float(terms["ce"]) < 0.5 * first


def test_text_ce_is_next_token_ce_after_the_prefix_and_trains_the_memory():
    ds = small_data()
    model, build = small_model(ds)
    head = model.head
    b = batch(ds)
    ids, mask = b["full_ids"][:, 1:], b["full_mask"][:, 1:]
    with torch.no_grad():
        logits = head.run(head.embed(b["full_ids"]), b["full_mask"])[:, :-1]
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
        ref = (ref * mask.reshape(-1)).sum() / mask.sum()
        assert torch.allclose(text_ce(head, None, ids, mask), ref, atol=1e-5)
    obj = CompressorLoss(CompressorLossConfig(ce_weight=0.0, ae_weight=1.0), build)
    loss, terms = obj(model, b)
    loss.backward()
    assert "ae_ce" in terms and "ce" not in terms  # no answer pass in a memory-only stage
    assert model.memory.queries.grad is not None and float(model.memory.queries.grad.abs().sum()) > 0


def test_slot_targets_are_the_oracle_slots_prefix_and_regression_is_zero_on_them():
    ds = small_data()
    model, build = small_model(ds, memory_kw={"n_slots": 16})
    b = batch(ds, budget=64)
    targets, valid = slot_targets(model.head, b)
    prefix, pmask = model.head.prefix_for(b, "oracle_slots")
    assert torch.equal(prefix, targets) and torch.equal(pmask.bool(), valid) and int(valid.sum(1)[0]) == 9
    padded = torch.cat([targets, torch.randn(4, 16 - targets.shape[1], targets.shape[2])], 1)
    assert float(slot_regression(padded, targets, valid)) < 1e-9  # slots past the removed statements are free
    assert float(slot_regression(torch.zeros_like(padded), targets, valid)) == pytest.approx(1.0)
    obj = CompressorLoss(CompressorLossConfig(ce_weight=0.0, slot_weight=1.0), build)
    loss, terms = obj(model, b)
    loss.backward()
    assert "slot_mse" in terms and model.memory.proj.weight.grad is not None
    assert all(p.grad is None for p in model.head.parameters())  # the targets are detached


def test_slot_contrastive_labels_are_the_removed_digits():
    ds = small_data()
    model, build = small_model(ds, memory_kw={"n_slots": 16})
    b = batch(ds, n=8, budget=96)
    labels, valid = slot_labels(b, 16)
    assert labels.shape == (8, 16) and int(valid.sum(1)[0]) == 6 and (labels[~valid] == -1).all()
    assert set(labels[valid].tolist()) <= set(ds.answer_ids)
    obj = CompressorLoss(CompressorLossConfig(contrastive_weight=1.0, contrastive_by="slot"), build)
    loss, terms = obj(model, b)
    loss.backward()
    assert torch.isfinite(terms["info_nce"]) and float(terms["info_nce"]) > 0


def test_token_select_keeps_k_removed_tokens_in_order_as_reader_tokens():
    ds = small_data()
    model, build = small_model(ds, memory=False)
    sel = TokenSelect(TokenSelectConfig(n_slots=8, dim=32, n_heads=2, n_layers=1), build)
    head = model.head
    b = batch(ds, budget=64)
    sel.eval()
    out = sel(b["removed_ids"], b["removed_mask"])
    assert out.shape == (4, 8, head.width)
    chosen = sel.last_selected
    scores = sel.scores(b["removed_ids"], b["removed_mask"])
    top = scores.topk(8, dim=1).indices.sort(dim=1).values
    assert torch.equal(chosen, b["removed_ids"].gather(1, top))  # the k best, in their original order
    with torch.no_grad():
        assert torch.allclose(out, head.embed(chosen), atol=1e-6)  # read as tokens: the forward value is the embedding
    # the scorer learns through the straight-through gate; the reader's weights are not its parameters
    sel.train()
    head.requires_grad_(False)
    from engram_core.components import Model

    m = Model(head, sel, "context")
    logits = head.answer_logits(b, "latent")
    F.cross_entropy(logits, b["answer"]).backward()
    assert sel.score.weight.grad is not None and float(sel.score.weight.grad.abs().sum()) > 0
    assert not any(n.startswith("memory.reader") for n, _ in m.named_parameters())
    short = sel(b["removed_ids"][:, :5], b["removed_mask"][:, :5])  # fewer removed tokens than k: zero vectors pad
    assert short.shape == (4, 8, head.width) and float(short[:, 5:].abs().sum()) == 0.0


def _hf_overrides(path):
    return [f"data.tokenizer={path}", "data.n_turns=32", "head.backend=hf", f"head.hf_path={path}"]


@pytest.mark.parametrize("name, extra", [
    ("budget_sweep", []),
    ("lora_reader", ["head.lora_rank=4", 'stages.1.train=["memory.*", "head.*lora_*"]']),
])
def test_whole_budget_sweep_on_a_tiny_qwen2_with_its_own_tokenizer(name, extra, tmp_path):
    path = save_tiny_qwen2(tmp_path / "qwen2", 0, tokenizer=True)
    r = run_cli(RECIPES / f"{name}.toml", *shrink(name), *_hf_overrides(path), *extra, "--out", tmp_path / "runs",
                "--quiet", plugins="qwen-compressor", env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (summary,) = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")]
    final = summary["final"]
    modes = ("discard", "summary", "latent", "oracle_kv", "oracle_slots") if name == "budget_sweep" else ("latent",)
    assert {f"acc/{m}_b{b}" for m in modes for b in (64, 96, 128)} <= set(final)
    recipe = (next((tmp_path / "runs").rglob("recipe.toml"))).read_text()
    assert 'backend = "hf"' in recipe and str(path) in recipe


def test_hf_reader_with_byte_data_is_one_line_exit_2(tmp_path):
    path = save_tiny_qwen2(tmp_path / "qwen2", 0, tokenizer=True)
    r = run_cli(RECIPES / "budget_sweep.toml", *shrink("budget_sweep"), "head.backend=hf", f"head.hf_path={path}",
                "--out", tmp_path / "runs", "--quiet", plugins="qwen-compressor",
                env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.strip()]
    assert "data.tokenizer" in line
