"""The Hugging Face workflows a peft / Trainer user runs, and the faults of saved memories
(issue 33): the memory trains however the optimiser is built, print_trainable_parameters
tells the truth, a PeftModel's save keeps the memory, and loading into a model it does not
fit, or from a damaged file, is one line. Tiny models, built and saved by the tests."""

import json

import pytest
import torch
from engram_llm_hash import add_engram, engram_memory, from_pretrained
from hf_tiny import VOCAB, tiny_model
from llm_hash_helpers import perturb

from engram_core.config import ConfigError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))
PROBE = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))


def lora_config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", **kw)


def engram_llama(**kw):
    model = add_engram(tiny_model("llama", **kw), memory_size=3000, inject_layers=[0, 1], slot_dim=8)
    perturb(model.engram, 0.5)
    return model


def train_with(model, opt, steps=3):
    model.train()
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# ---- the memory trains however the optimiser is built ---------------------------------------
def test_optimizer_from_requires_grad_before_the_first_forward_trains_the_memory():
    base = engram_llama()
    wrapped = peft.get_peft_model(base, lora_config())
    # the usual way: the trainable parameters, before anything ran
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in base.engram.parameters() if p.requires_grad)
    rows = {k: b.table.weight.detach().clone() for k, b in base.engram.blocks.items()}
    train_with(wrapped, opt)
    assert all(not torch.equal(rows[k], b.table.weight) for k, b in base.engram.blocks.items())


def test_print_trainable_parameters_counts_what_the_optimizer_updates(capsys):
    base = engram_llama()
    wrapped = peft.get_peft_model(base, lora_config())

    def printed() -> int:
        wrapped.print_trainable_parameters()
        return int(capsys.readouterr().out.split("trainable params: ")[1].split()[0].replace(",", ""))

    before_training = printed()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    train_with(wrapped, torch.optim.AdamW(params, lr=1e-2))
    updated = sum(p.numel() for p, b in zip(params, before) if not torch.equal(p, b))
    memory = sum(p.numel() for p in base.engram.parameters() if p.requires_grad)
    assert memory > 0 and all(any(p is q for q in params) for p in base.engram.parameters() if p.requires_grad)
    assert before_training == printed() == updated  # what it counts, before and after, is what was updated


def test_trainer_with_its_own_optimizer_trains_the_memory(tmp_path):
    base = engram_llama()
    wrapped = peft.get_peft_model(base, lora_config())
    rows = base.engram.blocks["0"].table.weight.detach().clone()

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": IDS[i % 4], "labels": IDS[i % 4]}

    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=wrapped, args=args, train_dataset=Rows()).train()  # Trainer builds the optimiser
    assert not torch.equal(rows, base.engram.blocks["0"].table.weight)


def test_a_frozen_choice_is_kept():
    base = engram_llama()
    base.engram.requires_grad_(False)  # the adapters alone
    wrapped = peft.get_peft_model(base, lora_config())
    assert not any(p.requires_grad for p in base.engram.parameters())
    train_with(wrapped, torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2), steps=1)


def test_a_peft_wrapping_not_seen_refuses_to_train_with_the_fix():
    base = engram_llama()
    peft.inject_adapter_in_model(lora_config(), base)  # peft's low-level API: no PeftModel
    assert not any(p.requires_grad for p in base.engram.parameters())
    logits(base)  # inference runs as it is
    base.train()
    with pytest.raises(ConfigError) as err:
        base(input_ids=IDS, labels=IDS)
    assert "requires_grad_(True)" in one_line(err) and "modules_to_save" in str(err.value)
    base.engram.requires_grad_(True)
    base(input_ids=IDS, labels=IDS).loss.backward()
    assert base.engram.blocks["0"].table.weight.grad is not None


# ---- PeftModel.save_pretrained keeps the memory ------------------------------------------------
@pytest.mark.parametrize("order", ["add_engram_first", "peft_first"])
def test_peft_save_pretrained_keeps_the_trained_memory(tmp_path, order):
    torch.manual_seed(0)
    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "base")
    if order == "add_engram_first":
        wrapped = peft.get_peft_model(engram_llama(), lora_config())
    else:
        wrapped = add_engram(peft.get_peft_model(tiny_model("llama"), lora_config()), memory_size=3000, inject_layers=[0, 1], slot_dim=8)
        perturb(engram_memory(wrapped.get_base_model()), 0.5)
    train_with(wrapped, torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2))
    expected = logits(wrapped)
    wrapped.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "engram.safetensors").is_file() and (tmp_path / "adapter" / "adapter_config.json").is_file()
    # peft's own way back, onto add_engram(base) with the same settings
    fresh = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[0, 1], slot_dim=8)
    reloaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    assert torch.allclose(logits(reloaded), expected, atol=1e-6)
    # the package's: the base from a local folder, never the hub
    loaded = from_pretrained(tmp_path / "adapter", base_model=tmp_path / "base")
    assert torch.allclose(logits(loaded), expected, atol=1e-6)
    assert not torch.allclose(logits(plain), expected, atol=1e-3), "the memory and adapter matter, so the round trip is a test"


def test_from_pretrained_on_an_adapter_folder_without_a_local_base_is_one_line(tmp_path):
    wrapped = peft.get_peft_model(engram_llama(), lora_config())
    wrapped.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some-org/some-model-on-the-hub"
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as err:
        from_pretrained(tmp_path / "adapter")
    line = one_line(err)
    assert "some-org/some-model-on-the-hub" in line and "base_model=" in line and "nothing is downloaded" in line


# ---- loading into a model the memory does not fit, damaged files -----------------------------
@pytest.mark.parametrize("change, key", [({"vocab": VOCAB * 2}, "vocab_size"), ({"layers": 3}, "num_layers")])
def test_load_engram_into_another_model_names_the_mismatch(tmp_path, change, key):
    engram_llama().save_engram(tmp_path / "mem")
    other = add_engram(tiny_model("llama", **change), memory_size=3000, inject_layers=[0, 1], slot_dim=8)
    before = {k: v.clone() for k, v in other.engram.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        other.load_engram(tmp_path / "mem")
    assert key in one_line(err) and "saved for a model with" in str(err.value)
    assert all(torch.equal(v, other.engram.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_load_engram_into_another_width_names_it(tmp_path):
    engram_llama().save_engram(tmp_path / "mem")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256)
    wide = add_engram(transformers.AutoModelForCausalLM.from_config(config), memory_size=3000, inject_layers=[0, 1], slot_dim=8)
    with pytest.raises(ConfigError) as err:
        wide.load_engram(tmp_path / "mem")
    assert "hidden_size=32" in one_line(err) and "hidden_size=64" in str(err.value)
    # a memory saved before the model's dimensions were recorded: the shapes say it, in one line
    meta = json.loads((tmp_path / "mem" / "engram_config.json").read_text())
    del meta["model"]
    (tmp_path / "mem" / "engram_config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError) as err:
        wide.load_engram(tmp_path / "mem")
    assert "does not fit this model" in one_line(err)


def test_engram_config_records_the_models_dimensions(tmp_path):
    engram_llama().save_engram(tmp_path / "mem")
    meta = json.loads((tmp_path / "mem" / "engram_config.json").read_text())
    assert meta["model"] == {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_engram_safetensors_is_one_line(tmp_path, damage):
    model = engram_llama()
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "engram.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if damage == "truncated" else b"not safetensors at all" * 4)
    for load in (lambda: model.load_engram(tmp_path / "m"), lambda: from_pretrained(tmp_path / "m")):
        with pytest.raises(ConfigError) as err:
            load()
        assert "engram.safetensors is damaged" in one_line(err)


def test_a_damaged_engram_config_is_one_line(tmp_path):
    model = engram_llama()
    model.save_engram(tmp_path / "mem")
    (tmp_path / "mem" / "engram_config.json").write_text('{"engram_hash": {"memory_si')
    with pytest.raises(ConfigError) as err:
        model.load_engram(tmp_path / "mem")
    assert "engram_config.json is damaged" in one_line(err)
