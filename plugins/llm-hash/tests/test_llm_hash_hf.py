"""add_engram on tiny random transformers causal LMs that the test builds and saves."""

import json

import pytest
import torch
from engram_llm_hash import add_engram
from llm_hash_helpers import perturb

from engram_core.config import ConfigError

transformers = pytest.importorskip("transformers")


def _config(family: str, vocab: int = 128):
    common = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, eos_token_id=1, bos_token_id=0, pad_token_id=2,
    )
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[family]
    return cls(**common)


def save_tiny(tmp_path, family: str, vocab: int = 128):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, vocab))
    path = tmp_path / f"tiny-{family}"
    model.save_pretrained(path)
    return path


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_cached_generation_equals_uncached_with_trained_memory(tmp_path, family):
    model = load(save_tiny(tmp_path, family)).eval()
    prompt = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=True)
    add_engram(model, memory_size=5000, inject_layers=[0, 1], gate_type="context", slot_dim=8)
    perturb(model.engram, 1.0)  # "trained": non-zero, large
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=10, min_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain), "the trained memory should change generation"


def test_freeze_save_load_only_memory(tmp_path):
    path = save_tiny(tmp_path, "llama")
    model = add_engram(load(path), memory_size=3000, inject_layers=[1], gate_type="learned", slot_dim=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("engram.") for n in trainable)
    assert model.engram.blocks["1"].gate_bias.item() == -5.0  # the seed's gate: memory ignored until trained
    perturb(model.engram, 0.3)
    out_dir = model.save_engram(tmp_path / "mem")
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["engram.safetensors", "engram_config.json"]
    from safetensors.torch import load_file

    saved = load_file(str(out_dir / "engram.safetensors"))
    assert all(not k.startswith(("model.", "lm_head")) for k in saved)
    n_mem = sum(p.numel() for p in model.engram.parameters())
    assert sum(v.numel() for v in saved.values()) == n_mem
    # a fresh model + memory, loaded, gives the same logits
    other = add_engram(load(path), memory_size=3000, inject_layers=[1], gate_type="learned", slot_dim=8)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        before = other(ids).logits
        other.load_engram(out_dir)
        assert torch.allclose(other(ids).logits, model(ids).logits, atol=1e-5)
        assert not torch.allclose(before, model(ids).logits)
    wrong = add_engram(load(path), memory_size=3001, inject_layers=[1], gate_type="learned", slot_dim=8)
    with pytest.raises(ConfigError, match="memory_size"):
        wrong.load_engram(out_dir)


def test_training_step_moves_only_memory(tmp_path):
    model = add_engram(load(save_tiny(tmp_path, "qwen2")), memory_size=2000, inject_layers=[0], slot_dim=8)
    base = {n: p.clone() for n, p in model.named_parameters() if not n.startswith("engram.")}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (4, 12))
    loss0 = model(ids, labels=ids).loss
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < loss0.item()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_lora_with_engram(tmp_path):
    from engram_llm_hash.heads import inject_lora

    model = load(save_tiny(tmp_path, "llama"))
    inject_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"])
    add_engram(model, memory_size=2000, inject_layers=[0], slot_dim=8)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in names) and any(n.startswith("engram.") for n in names)
    ids = torch.randint(3, 128, (2, 8))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_bad_input_is_config_error(tmp_path):
    path = save_tiny(tmp_path, "llama")
    with pytest.raises(ConfigError, match="inject_layers: layer index 2 out of range"):
        add_engram(load(path), memory_size=100, inject_layers=[2])
    with pytest.raises(ConfigError, match="memory_size"):
        add_engram(load(path), memory_size=0, inject_layers=[0])
    with pytest.raises(ConfigError, match="gate_type"):
        add_engram(load(path), memory_size=10, inject_layers=[0], gate_type="magic")
    from engram_llm_hash.hf import load_causal_lm

    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)).save_pretrained(bert)
    with pytest.raises(ConfigError, match="model_dir: .*'bert' model, which is not a decoder-only causal LM"):
        load_causal_lm(str(bert))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ConfigError, match="not a transformers model directory|not a decoder-only causal LM"):
        load_causal_lm(str(junk))
    with pytest.raises(ConfigError, match="does not exist"):
        load_causal_lm(str(tmp_path / "nope"))
