"""add_engram on tiny random transformers causal LMs that the test builds and saves."""

import inspect
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


def _cache_keyword(model) -> str:
    """The public name of the top-level KV-cache argument: `cache` from transformers 5.24,
    `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_stepwise_cached_calls_equal_one_uncached_call(tmp_path, family):
    """Prefill, then one token a call with the KV cache on the top-level model (as generate
    does): the logits at every position equal one uncached call over the whole sequence."""
    model = add_engram(load(save_tiny(tmp_path, family)).eval(), memory_size=5000, inject_layers=[0, 1], slot_dim=8)
    perturb(model.engram, 1.0)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    prefill = 5
    kw = _cache_keyword(model)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = transformers.DynamicCache()
        steps = [model(input_ids=ids[:, :prefill], use_cache=True, **{kw: cache}).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(input_ids=ids[:, t : t + 1], use_cache=True, **{kw: cache}).logits)
        assert cache.get_seq_length() == ids.shape[1]
        stepped = torch.cat(steps, dim=1)
        model.engram.enabled = False
        bare = model(input_ids=ids, use_cache=False).logits
        model.engram.enabled = True
    assert stepped.shape == full.shape
    assert torch.allclose(stepped, full, atol=1e-5), (stepped - full).abs().max()
    assert (full - bare).abs().max() > 1e-2, "the memory should change the logits"


def test_cached_generation_with_left_padding(tmp_path):
    model = add_engram(load(save_tiny(tmp_path, "llama")).eval(), memory_size=5000, inject_layers=[0, 1], slot_dim=8)
    perturb(model.engram, 1.0)
    prompt = torch.randint(3, 128, (3, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)
    prompt[0, :3], mask[0, :3] = 2, 0  # left padding
    prompt[2, :1], mask[2, :1] = 2, 0
    opts = dict(attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **opts)
        uncached = model.generate(prompt, use_cache=False, **opts)
    assert torch.equal(cached, uncached)


def test_cached_generation_through_a_peft_model(tmp_path):
    """get_peft_model wraps the model after add_engram; peft < 0.15 calls model.forward
    directly, so the ids must be taken there, not in a forward pre-hook."""
    peft = pytest.importorskip("peft")
    model = add_engram(load(save_tiny(tmp_path, "qwen2")).eval(), memory_size=5000, inject_layers=[0, 1], slot_dim=8)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    perturb(model.engram, 1.0)
    prompt = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(4))
    opts = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        cached = wrapped.generate(input_ids=prompt, use_cache=True, **opts)
        uncached = wrapped.generate(input_ids=prompt, use_cache=False, **opts)
        logits = wrapped(input_ids=prompt).logits
        model.engram.enabled = False
        bare = wrapped(input_ids=prompt).logits
    assert torch.equal(cached, uncached)
    assert (logits - bare).abs().max() > 1e-2, "the memory should act through the peft wrapper"


def test_remove_engram_restores_the_model(tmp_path):
    model = load(save_tiny(tmp_path, "llama")).eval()
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        before = model(ids).logits
    add_engram(model, memory_size=500, inject_layers=[0], slot_dim=8)
    assert "input_ids" in inspect.signature(model.forward).parameters  # generate inspects it
    perturb(model.engram, 1.0)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, before)
    model.remove_engram()
    assert "forward" not in model.__dict__ and not hasattr(model, "engram")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_decoder_called_alone_is_an_error(tmp_path):
    model = add_engram(load(save_tiny(tmp_path, "llama")).eval(), memory_size=500, inject_layers=[0], slot_dim=8)
    with torch.no_grad(), pytest.raises(RuntimeError, match="outside the model's forward"):
        model.get_decoder()(input_ids=torch.randint(3, 128, (1, 4)))


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
