"""Reader modes, LoRA adapters (builtin and peft), the HF path on a tiny saved Qwen2,
objectives and metrics, and the one-line errors for bad input."""

import pytest
import torch
from engram_qwen_compressor.memories import MemEncoder, MemEncoderConfig, ReaderEncoder, ReaderEncoderConfig
from engram_qwen_compressor.metrics import (
    Collapse,
    CollapseConfig,
    DigitAccuracy,
    DigitAccuracyConfig,
    GradCheck,
    GradCheckConfig,
    effective_rank,
)
from engram_qwen_compressor.objectives import (
    AnswerCE,
    AnswerCEConfig,
    CompressorLoss,
    CompressorLossConfig,
    Contrastive,
    ContrastiveConfig,
    OracleCosine,
    OracleCosineConfig,
    supervised_info_nce,
)
from engram_qwen_compressor.reader import MODES, CompressorReader, ReaderConfig
from qwen_compressor_helpers import batch, save_tiny_qwen2, save_tiny_tokenizer, small_data, small_model

from engram_core.components import BuildContext, Model
from engram_core.config import ConfigError, structure


def test_every_mode_gives_answer_logits_and_prefix_enters_after_bos():
    ds = small_data()
    model, _ = small_model(ds)
    b = batch(ds)
    for mode in MODES:
        out = model.head.answer_logits(b, mode)
        assert out.shape == (4, 259) and torch.isfinite(out).all()
    # latent depends on the memory output; discard does not
    with torch.no_grad():
        lat1 = model.head.answer_logits(b, "latent")
        model.memory.out_norm.bias.add_(1.0)
        lat2 = model.head.answer_logits(b, "latent")
    assert float((lat1 - lat2).abs().max()) > 0  # small at init: attention to the prefix is weak
    # a zero-width change check: latent with K prefix vectors is a K-longer sequence
    seen = {}
    orig = model.head.run
    model.head.run = lambda e, m, hidden=False: seen.setdefault("len", e.shape[1]) and orig(e, m, hidden)
    model.head.answer_logits(b, "latent")
    assert seen["len"] == b["kept_ids"].shape[1] + model.memory.cfg.n_slots


def test_latent_without_memory_and_oracle_without_gold_are_config_errors():
    model, _ = small_model(memory=False)
    with pytest.raises(ConfigError, match="needs a memory"):
        model.head.answer_logits(batch(small_data()), "latent")
    ds = small_data(gold_fields=False)
    model, build = small_model(ds)
    with pytest.raises(ConfigError, match="gold fields"):
        model.head.answer_logits(batch(ds), "oracle_kv")
    for cls, cfg in ((AnswerCE, AnswerCEConfig(modes=["oracle_digit"])), (DigitAccuracy, DigitAccuracyConfig(modes=["oracle_kv"])),
                     (OracleCosine, OracleCosineConfig()), (CompressorLoss, CompressorLossConfig(cosine_weight=1.0))):
        with pytest.raises(ConfigError, match="gold_fields"):
            cls(cfg, build)


def test_k_zero_and_width_mismatch_are_config_errors():
    with pytest.raises(ConfigError) as e:
        structure({"n_slots": 0}, MemEncoderConfig)
    assert "n_slots" in str(e.value) and "> 0" in str(e.value)
    ds = small_data()
    _, build = small_model(ds, memory=False)
    with pytest.raises(ConfigError, match="reader's embedding width is 32"):
        MemEncoder(MemEncoderConfig(dim=32, n_heads=2, out_dim=48), build)
    MemEncoder(MemEncoderConfig(dim=32, n_heads=2, out_dim=32), build)  # matching width is fine
    with pytest.raises(ConfigError, match="budget"):
        AnswerCE(AnswerCEConfig(budgets=[400]), build)


def test_builtin_lora_starts_as_identity_and_adapters_switch():
    ds = small_data()
    plain, _ = small_model(ds, memory=False, seed=3)
    lora, _ = small_model(ds, memory=False, reader_kw={"lora_rank": 4}, seed=3)
    b = batch(ds)
    names = [n for n, _ in lora.named_parameters()]
    assert any(".lora.reader.A" in n for n in names) and any(n.endswith("qkv.base.weight") for n in names)
    with torch.no_grad():
        assert torch.allclose(plain.head.answer_logits(b, "summary"), lora.head.answer_logits(b, "summary"), atol=1e-6)
        for n, p in lora.named_parameters():
            if ".lora.reader.B" in n:
                p.normal_()
        changed = lora.head.answer_logits(b, "summary")
        with lora.head.adapters.only(()):
            off = lora.head.answer_logits(b, "summary")
    assert not torch.allclose(changed, off) and torch.allclose(off, plain.head.answer_logits(b, "summary"), atol=1e-6)


def test_reader_encoder_writes_memory_with_its_own_adapter():
    ds = small_data()
    model, build = small_model(ds, memory=False, reader_kw={"lora_rank": 2})
    mem = ReaderEncoder(ReaderEncoderConfig(n_slots=3, lora_rank=2), build)
    model = Model(model.head, mem, "context")
    b = batch(ds)
    out = mem(b["removed_ids"], b["removed_mask"])
    assert out.shape == (4, 3, 32)
    loss = model.head.answer_logits(b, "latent").logsumexp(-1).sum()
    loss.backward()
    enc = [p.grad for n, p in model.named_parameters() if ".lora.encoder." in n and n.endswith(".A")]
    assert enc and all(g is not None for g in enc)
    assert mem.slots.grad is not None


def _save_tiny_qwen2(path, vocab=259):
    return save_tiny_qwen2(path, vocab)


def test_hf_qwen2_reader_from_a_local_dir_with_peft_lora(tmp_path):
    path = save_tiny_qwen2(tmp_path / "qwen2", 0, tokenizer=True)
    ds = small_data(tokenizer=str(path), n_turns=32)
    build = BuildContext(spec=ds.spec, dataset=ds)
    head = CompressorReader(structure({"backend": "hf", "hf_path": str(path), "lora_rank": 4}, ReaderConfig), build)
    assert head.width == 32 and head._peft
    names = [n for n, _ in head.named_parameters()]
    assert any("lora_A" in n for n in names)
    build.head = head
    mem = MemEncoder(MemEncoderConfig(dim=32, n_heads=2, n_cross_layers=1), build)
    model = Model(head, mem, "context")
    b = batch(ds)
    obj = CompressorLoss(CompressorLossConfig(contrastive_weight=0.5), build)
    loss, terms = obj(model, b)
    loss.backward()
    assert torch.isfinite(loss) and {"ce", "acc", "info_nce", "oracle_cos"} <= set(terms)
    assert any(p.grad is not None for n, p in head.named_parameters() if "lora_A" in n)
    assert mem.queries.grad is not None
    # identical to the plain HF model before LoRA trains (B starts at zero)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path)
    e = plain.get_input_embeddings()(b["summary_ids"])
    ref = plain(inputs_embeds=e, attention_mask=b["summary_mask"]).logits[torch.arange(4), b["summary_answer_pos"]]
    with torch.no_grad():
        assert torch.allclose(head.answer_logits(b, "summary"), ref, atol=1e-5)


def test_hf_reader_vocabulary_too_small_is_a_config_error(tmp_path):
    tok_dir = tmp_path / "tok"
    save_tiny_tokenizer(tok_dir)
    path = _save_tiny_qwen2(tmp_path / "q", vocab=128)
    ds = small_data(tokenizer=str(tok_dir), n_turns=32)
    with pytest.raises(ConfigError, match="vocabulary"):
        CompressorReader(ReaderConfig(backend="hf", hf_path=str(path)), BuildContext(spec=ds.spec))
    # raw byte ids are not the model's token ids: the data must use its tokenizer
    with pytest.raises(ConfigError, match="data.tokenizer"):
        CompressorReader(ReaderConfig(backend="hf", hf_path=str(path)), BuildContext(spec=small_data().spec))
    with pytest.raises(ConfigError, match="hf_path"):
        ReaderConfig(backend="hf")


def test_info_nce_prefers_label_clusters_and_handles_no_positives():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    centers = torch.randn(3, 16)
    clustered = centers[labels] + 0.01 * torch.randn(6, 16)
    shuffled = centers[torch.tensor([0, 1, 2, 0, 1, 2])] + 0.01 * torch.randn(6, 16)
    assert supervised_info_nce(clustered, labels, 0.1) < supervised_info_nce(shuffled, labels, 0.1) - 1.0
    assert float(supervised_info_nce(torch.randn(3, 4), torch.tensor([0, 1, 2]), 0.1)) == 0.0


def test_objectives_log_their_terms_and_train_the_encoder():
    ds = small_data()
    model, build = small_model(ds)
    b = batch(ds, n=8)
    for obj, keys in ((AnswerCE(AnswerCEConfig(modes=["latent", "summary"]), build), {"ce_latent", "acc_summary"}),
                      (OracleCosine(OracleCosineConfig(oracle_target="gold_kv"), build), {"oracle_cos", "acc"}),
                      (Contrastive(ContrastiveConfig(), build), {"info_nce"}),
                      (CompressorLoss(CompressorLossConfig(cosine_weight=1.0, contrastive_weight=1.0), build), {"ce", "oracle_cos", "info_nce"})):
        model.zero_grad()
        loss, terms = obj(model, b)
        loss.backward()
        assert keys <= set(terms) and torch.isfinite(loss)
        assert model.memory.queries.grad is not None and float(model.memory.queries.grad.norm()) > 0
    with pytest.raises(ConfigError, match="mode"):
        CompressorLossConfig(mode="summary", contrastive_weight=1.0)


def test_overfit_one_episode_in_a_few_steps():
    ds = small_data()
    model, build = small_model(ds)
    obj = CompressorLoss(CompressorLossConfig(overfit_one=True), build)
    one = obj.sample(ds, "train", 3, torch.Generator())
    assert (one["full_ids"] == one["full_ids"][0]).all()
    opt = torch.optim.Adam([p for n, p in model.named_parameters()], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        loss, terms = obj(model, obj.sample(ds, "train", 4, g))
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * first and float(terms["acc"]) == 1.0


def test_collapse_metric_on_constant_and_on_varied_memory():
    assert effective_rank(torch.ones(10, 6)) == pytest.approx(1.0, abs=1e-6)
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, rel=1e-6)
    ds = small_data()
    model, build = small_model(ds)
    metric = Collapse(CollapseConfig(max_examples=32), build)
    for constant in (True, False):
        metric.reset()
        with torch.no_grad():
            if constant:  # a collapsed encoder: the output ignores the tokens
                model.memory.tok.weight.zero_()
                model.memory.pos.weight.zero_()
            for b in metric.batches(ds, "eval", 16):
                metric.update(model, b)
        out = metric.compute()
        if constant:
            assert out["collapse/batch_cos"] > 0.9999 and out["collapse/erank"] < 1.01 and out["collapse/rel_spread"] < 1e-3
        else:
            assert out["collapse/rel_spread"] > 1e-3
        assert {"collapse/consecutive_cos", "collapse/centroid_acc", "collapse/oracle_cos_digit", "collapse/oracle_cos_kv"} <= set(out)
        model, build = small_model(ds)


def test_accuracy_metric_per_mode_and_budget_with_chance_and_grad_check():
    ds = small_data(budgets=[64, 96])
    model, build = small_model(ds)
    metric = DigitAccuracy(DigitAccuracyConfig(modes=["discard", "latent"], max_examples=16), build)
    metric.reset()
    with torch.no_grad():
        for b in metric.batches(ds, "eval", 8):
            metric.update(model, b)
    out = metric.compute()
    assert {k for k in out if k.startswith("acc/")} == {"acc/discard_b64", "acc/discard_b96", "acc/latent_b64",
                                                       "acc/latent_b96", "acc/chance"}
    assert out["acc/chance"] == 0.1 and all(0.0 <= v <= 1.0 for v in out.values())
    # the breakdown (latent only): per target position and per number of removed statements
    assert {k for k in out if k.startswith("acc_nrem/")} == {"acc_nrem/latent_n09", "acc_nrem/latent_n06"}
    pos64 = [k for k in out if k.startswith("acc_pos/latent_b64_p")]
    assert pos64 and all(int(k[-2:]) < 9 for k in pos64) and not any(k.startswith("acc_pos/discard") for k in out)
    assert out["acc_nrem/latent_n09"] == out["acc/latent_b64"]  # rigid template: budget 64 always removes 9
    with pytest.raises(ConfigError, match="breakdown"):
        DigitAccuracy(DigitAccuracyConfig(modes=["discard"], breakdown=["latent"]), build)
    gc = GradCheck(GradCheckConfig(n_batches=1), build)
    model.head.requires_grad_(False)
    gc.reset()
    for b in gc.batches(ds, "eval", 4):
        gc.update(model, b)
    res = gc.compute()
    assert res["debug/encoder_grad_norm"] > 0 and res["debug/reader_grad_norm"] == 0.0
    assert all(p.grad is None for p in model.parameters())  # training gradients left as they were
    stats = model.memory.stats()
    assert stats["param_update"] == 0.0 and "batch_cos" in stats


def test_token_shift_hands_each_token_its_predecessors():
    ds = small_data()
    model, _ = small_model(ds, memory=False)
    head = model.head
    ids = torch.tensor([[257, 75, 69, 89, 56, 55], [257, 75, 69, 89, 57, 55]])  # differ at position 4 only
    with torch.no_grad():
        e = head.embed(ids)
        plain = head.lm.embed(ids)
    assert torch.allclose(e[:, :4], e[:1, :4].expand(2, -1, -1))  # the past is the same
    assert not torch.allclose(e[0, 5], e[1, 5])  # same token '7', different predecessor
    assert torch.allclose(plain[0, 5], plain[1, 5])
    assert not any("shift" in n for n, _ in head.named_parameters())  # 'fixed' shift is a buffer, never trained
    off, _ = small_model(ds, memory=False, reader_kw={"token_shift": 0})
    with torch.no_grad():
        assert torch.allclose(off.head.embed(ids), off.head.lm.embed(ids))
    learned, _ = small_model(ds, memory=False, reader_kw={"shift_mode": "learned"})
    assert any(n.endswith("shift") for n, _ in learned.head.named_parameters())


def test_peft_lora_on_the_core_reader():
    ds = small_data()
    plain, _ = small_model(ds, memory=False, seed=4)
    peft_model, _ = small_model(ds, memory=False, reader_kw={"lora_rank": 4, "lora_impl": "peft"}, seed=4)
    names = [n for n, _ in peft_model.named_parameters()]
    assert any("qkv.lora_A.default" in n for n in names)
    b = batch(ds)
    with torch.no_grad():
        assert torch.allclose(plain.head.answer_logits(b, "summary"), peft_model.head.answer_logits(b, "summary"), atol=1e-6)
