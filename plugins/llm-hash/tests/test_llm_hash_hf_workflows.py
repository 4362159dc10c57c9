"""add_engram in the standard transformers / peft workflows: bf16, peft (both orders,
modules_to_save, merge_and_unload), Trainer (param groups, save_model + from_pretrained),
gradient checkpointing, canonical ids of a trained byte-level BPE, one-line load errors."""

import json
import logging

import pytest
import torch
from engram_llm_hash import add_engram, engram_memory, engram_param_groups, from_pretrained
from hf_tiny import PAD, VOCAB, padded_batch, tiny_model
from llm_hash_helpers import perturb

from engram_core.config import ConfigError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def lora_config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kw)


def train_steps(model, steps=4, lr=1e-2, ids=None):
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7)) if ids is None else ids
    opt = torch.optim.AdamW(engram_param_groups(model, lr=lr))
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return ids


# ---- dtype and device --------------------------------------------------------------------
def test_bf16_model_trains_and_generates_in_bf16():
    model = tiny_model("qwen2").to(torch.bfloat16)
    add_engram(model, memory_size=3000, inject_layers=[0, 1], slot_dim=8)
    assert {p.dtype for p in model.engram.parameters()} == {torch.bfloat16}
    rows = model.engram.blocks["0"].table.weight.detach().clone()
    train_steps(model, steps=2)
    assert not torch.equal(rows, model.engram.blocks["0"].table.weight)
    ids, mask, _ = padded_batch([6, 4], seed=1)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=PAD)
        assert model(input_ids=ids, output_hidden_states=True).hidden_states[-1].dtype == torch.bfloat16
    assert out.shape == (2, ids.shape[1] + 4)
    model.to(torch.float32)  # model.to(...) moves and casts the memory with the model
    assert {p.dtype for p in model.engram.parameters()} == {torch.float32}


def test_fp32_master_table_with_bf16_reads():
    model = add_engram(tiny_model("llama").to(torch.bfloat16), memory_size=3000, inject_layers=[1], slot_dim=8, table_dtype="float32")
    block = model.engram.blocks["1"]
    assert block.table.weight.dtype == torch.float32 and block.value_proj.weight.dtype == torch.bfloat16
    before = block.table.weight.detach().clone()
    train_steps(model, steps=2, lr=1e-3)
    assert block.table.weight.dtype == torch.float32
    w = block.table.weight.detach()
    assert not torch.equal(w, before)
    # the master rows hold values that bf16 cannot: updates below bf16's resolution are kept
    moved = w != before
    assert moved.any() and (w[moved] != w[moved].to(torch.bfloat16).float()).float().mean() > 0.9
    with pytest.raises(ConfigError, match="table_dtype"):
        add_engram(tiny_model("llama"), memory_size=100, inject_layers=[0], table_dtype="float8")


# ---- peft --------------------------------------------------------------------------------
def _moved_and_changed(model, run_model):
    mem = engram_memory(model)
    rows = {k: b.table.weight.detach().clone() for k, b in mem.blocks.items()}
    probe = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        before = run_model(input_ids=probe).logits
    train_steps(run_model, steps=3)
    mem = engram_memory(model)
    moved = all(not torch.equal(rows[k], b.table.weight) for k, b in mem.blocks.items())
    with torch.no_grad():
        after = run_model(input_ids=probe).logits
        mem.enabled = False
        off = run_model(input_ids=probe).logits
        mem.enabled = True
    return moved, (after - before).abs().max(), (after - off).abs().max()


def test_peft_after_add_engram_keeps_memory_trainable_and_used():
    model = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[0, 1], slot_dim=8)
    perturb(model.engram, 0.5)
    wrapped = peft.get_peft_model(model, lora_config())
    lora = [n for n, p in wrapped.named_parameters() if "lora_" in n]
    assert lora
    with torch.no_grad():
        wrapped(input_ids=torch.randint(3, VOCAB, (1, 4)))
    # peft froze the memory with the base; add_engram's watch gave it back its trainability as
    # get_peft_model returned, so an optimiser over the trainable parameters includes it
    assert all(p.requires_grad for p in model.engram.parameters())
    moved, changed, used = _moved_and_changed(model, wrapped)
    assert moved and changed > 1e-3 and used > 1e-3
    assert all(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n and "engram" not in n)
    _merge_keeps_memory(wrapped)


def test_add_engram_after_peft_keeps_memory_trainable_and_used():
    wrapped = peft.get_peft_model(tiny_model("qwen2"), lora_config())
    add_engram(wrapped, memory_size=3000, inject_layers=[1], slot_dim=8)
    perturb(engram_memory(wrapped.get_base_model()), 0.5)
    lora = {n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_B" in n}
    moved, changed, used = _moved_and_changed(wrapped.get_base_model(), wrapped)
    assert moved and changed > 1e-3 and used > 1e-3
    assert any(not torch.equal(p, lora[n]) for n, p in wrapped.named_parameters() if n in lora), "LoRA trained too"
    _merge_keeps_memory(wrapped)


def test_peft_modules_to_save_trains_the_copy_that_runs():
    model = add_engram(tiny_model("mistral"), memory_size=3000, inject_layers=[0], slot_dim=8)
    perturb(model.engram, 0.5)
    wrapped = peft.get_peft_model(model, lora_config(modules_to_save=["engram"]))
    moved, changed, used = _moved_and_changed(model, wrapped)
    assert moved and changed > 1e-3 and used > 1e-3
    assert engram_memory(model) is not model.engram.original_module  # the copy peft trains is the one that runs
    _merge_keeps_memory(wrapped)


def _merge_keeps_memory(wrapped):
    probe = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        before = wrapped(input_ids=probe).logits
        merged = wrapped.merge_and_unload()
        after = merged(input_ids=probe).logits
    assert hasattr(merged, "engram")
    assert torch.allclose(before, after, atol=1e-5)


# ---- Trainer, save_pretrained, from_pretrained -----------------------------------------------
def test_param_groups():
    model = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[0, 1], slot_dim=8, gate_type="learned")
    for n, p in model.named_parameters():
        if n.endswith("lm_head.weight") or n.endswith("norm.weight"):
            p.requires_grad_(True)  # an unfrozen part of the base
    groups = {g["name"]: g for g in engram_param_groups(model, lr=1e-3, weight_decay=0.1)}
    tables = groups["engram_tables"]
    assert tables["lr"] == pytest.approx(5e-3) and tables["weight_decay"] == 0.0
    assert {id(p) for p in tables["params"]} == {id(b.table.weight) for b in model.engram.blocks.values()}
    assert groups["engram"]["weight_decay"] == 0.0 and groups["engram"]["lr"] == 1e-3
    assert groups["decay"]["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0
    covered = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    sparse = add_engram(tiny_model("llama"), memory_size=300, inject_layers=[0], slot_dim=8, sparse=True)
    with pytest.raises(ConfigError, match="SparseAdam"):
        engram_param_groups(sparse, lr=1e-3)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, VOCAB, (n, 10), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_memory_saves_and_reloads(tmp_path):
    model = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[1], slot_dim=8)
    rows = model.engram.blocks["1"].table.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        weight_decay=0.1, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    opt = torch.optim.AdamW(engram_param_groups(model, lr=args.learning_rate, weight_decay=args.weight_decay))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(), optimizers=(opt, None))
    trainer.train()
    assert not torch.equal(rows, model.engram.blocks["1"].table.weight)
    save_dir = tmp_path / "saved"
    trainer.save_model(str(save_dir))
    names = sorted(p.name for p in save_dir.iterdir())
    assert "engram.safetensors" in names and "engram_config.json" in names
    from safetensors.torch import load_file

    weights = [p for p in save_dir.iterdir() if p.name.startswith("model") and p.suffix == ".safetensors"]
    assert weights and not any(k.startswith("engram.") for w in weights for k in load_file(str(w)))
    model.eval()
    probe = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    loaded = from_pretrained(save_dir).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, model(input_ids=probe).logits)
        plain = transformers.AutoModelForCausalLM.from_pretrained(save_dir).eval()(input_ids=probe).logits
    assert not torch.allclose(plain, model(input_ids=probe).logits), "the memory matters, so the round trip is a test"
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if not n.startswith("engram."))


def test_save_pretrained_round_trip_bf16_and_canonical(tmp_path):
    tok = trained_bpe(tmp_path)
    model = tiny_model("qwen2", vocab=len(tok)).to(torch.bfloat16)
    add_engram(model, memory_size=3000, inject_layers=[0], slot_dim=8, canonical=True, tokenizer=tok, table_dtype="float32")
    perturb(model.engram, 0.5)
    model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "engram_config.json").read_text())
    assert meta["table_dtype"] == "float32" and meta["engram_hash"]["canonical"] is True
    loaded = from_pretrained(tmp_path / "m", dtype=torch.bfloat16) if _new_dtype_kw() else from_pretrained(tmp_path / "m", torch_dtype=torch.bfloat16)
    assert loaded.engram.blocks["0"].table.weight.dtype == torch.float32
    probe = torch.tensor([tok.encode("Hello hello HELLO world")])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=probe).logits, model(input_ids=probe).logits)


def _new_dtype_kw():
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("4.56")


# ---- gradient checkpointing --------------------------------------------------------------
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_gradients_usage_counted_once(reentrant):
    ids, mask, _ = padded_batch([10, 6, 8], side="right", seed=6)
    labels = ids.masked_fill(mask == 0, -100)
    grads, usage = [], []
    for checkpointing in (False, True):
        model = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[0, 1], slot_dim=8)
        perturb(model.engram, 0.5)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                model.enable_input_require_grads()  # a frozen base: the checkpointed input must require grad
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.engram.named_parameters() if p.grad is not None})
        usage.append({k: b.usage.clone() for k, b in model.engram.blocks.items()})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5), n
    for k in usage[0]:
        assert torch.equal(usage[0][k], usage[1][k])
        assert int(usage[0][k].sum()) == int(mask.sum()) * model.engram.blocks[k].hasher.n_heads  # kept positions only


# ---- canonical ids ----------------------------------------------------------------------
CORPUS = [
    "Hello world, hello World, HELLO WORLD.",
    "Café café CAFÉ naïve NAÏVE résumé",
    "The quick brown fox jumps over the lazy dog. the QUICK brown FOX",
    "日本語のテキスト、中文文本，한국어 텍스트 ✓ ✗ → ←",
    "CAPITAL:France=Paris CAPITAL:Germany=Berlin PORT:ssh=22 HTTP:404=Not Found",
] * 20


def trained_bpe(tmp_path, vocab_size=400):
    """A byte-level BPE trained here (tokenizers), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path / "bpe")
    return transformers.AutoTokenizer.from_pretrained(tmp_path / "bpe")


def test_canonical_ids_of_a_byte_level_bpe(tmp_path):
    from engram_llm_hash.canonical import compression_ratio, tokenizer_canonical_ids

    tok = trained_bpe(tmp_path)
    canon = tokenizer_canonical_ids(tok)
    assert canon.numel() == len(tok)
    texts = tok.batch_decode([[i] for i in range(len(tok))])
    byte_tokens = [i for i, t in enumerate(texts) if "\ufffd" in t]
    assert len(byte_tokens) > 50  # the 128 non-ASCII bytes of the alphabet, and partial pieces
    assert len({int(canon[i]) for i in byte_tokens}) == len(byte_tokens), "byte tokens stay distinct"
    vocab = tok.get_vocab()

    def cid(piece):
        return int(canon[vocab[piece]])

    assert cid("H") == cid("h") and cid("Ġ") != cid("H")
    for a, b in [("Hello", "hello"), ("ĠWorld", "Ġworld"), ("ĠHELLO", "Ġhello")]:
        if a in vocab and b in vocab:
            assert cid(a) == cid(b), (a, b)
    special = [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]
    assert len({int(canon[i]) for i in special}) == 3
    assert compression_ratio(canon) > 1.0
    model = add_engram(tiny_model("llama", vocab=len(tok)), memory_size=2000, inject_layers=[0], slot_dim=8, canonical=True, tokenizer=tok)
    assert model.engram.stats()["vocab_compression"] == pytest.approx(compression_ratio(canon))
    a = torch.tensor([tok.encode("Hello world")])
    b = torch.tensor([tok.encode("hello World")])
    if a.shape == b.shape:
        assert torch.equal(model.engram.addresses(a), model.engram.addresses(b))


# ---- loading errors ---------------------------------------------------------------------
def test_non_causal_lm_directory_is_one_line_without_noise(tmp_path, capfd, caplog):
    from engram_llm_hash.hf import load_causal_lm

    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    capfd.readouterr()
    with caplog.at_level(logging.INFO), pytest.raises(ConfigError) as err:
        load_causal_lm(str(bert))
    out = capfd.readouterr()
    assert "not a decoder-only causal LM" in str(err.value) and "\n" not in str(err.value)
    assert out.out == "" and out.err == ""
    assert not [r for r in caplog.records if r.name.startswith("transformers")]


def test_non_causal_lm_directory_through_engram_run(tmp_path, capfd, monkeypatch):
    """What a user sees: exactly one line on stderr, exit status 2."""
    from pathlib import Path

    from engram_core.cli import run_main

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    capfd.readouterr()
    recipe = Path(__file__).resolve().parents[3] / "recipes" / "hf_exact_match.toml"
    code = run_main([str(recipe), f"head.model_dir={bert}", f"run.out_dir={tmp_path / 'runs'}", "data.n_synthetic=10", "--quiet"])
    out = capfd.readouterr()
    lines = [ln for ln in (out.out + out.err).splitlines() if ln.strip()]
    assert code == 2
    assert len(lines) == 1 and "head.model_dir" in lines[0] and "not a decoder-only causal LM" in lines[0], lines
