"""add_engram under generate: greedy, seeded sampling, beam search, StaticCache, padding.

Every comparison uses trained (non-zero, large) memory, so a wrong history would change
tokens. Five tiny random families: Llama, Qwen2, Mistral, Gemma-style, Phi-3-style.
"""

import pytest
import torch
from engram_llm_hash import add_engram
from hf_tiny import FAMILIES, PAD, padded_batch, positions, tiny_model
from llm_hash_helpers import perturb

transformers = pytest.importorskip("transformers")

MODES = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0, temperature=1.0),
    "beam2": dict(do_sample=False, num_beams=2),
    "beam3": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "beam4": dict(do_sample=False, num_beams=4),
}


def engram_model(family, layers=(0, 1), scale=1.0):
    model = add_engram(tiny_model(family), memory_size=5000, inject_layers=list(layers), slot_dim=8)
    perturb(model.engram, scale)  # "trained": non-zero and large
    return model


def generate(model, ids, mask, use_cache, **opts):
    if opts.get("do_sample"):
        torch.manual_seed(123)
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, pad_token_id=PAD, use_cache=use_cache, **opts
        )


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_uncached(family, mode):
    """A left-padded batch of mixed lengths: use_cache=True gives the tokens of use_cache=False."""
    model = engram_model(family)
    ids, mask, _ = padded_batch([7, 4], side="left", seed=1)
    opts = MODES[mode]
    cached = generate(model, ids, mask, True, **opts)
    uncached = generate(model, ids, mask, False, **opts)
    assert torch.equal(cached, uncached), (family, mode)
    model.engram.enabled = False
    bare = generate(model, ids, mask, True, **opts)
    assert not torch.equal(cached, bare), "the trained memory should change generation"


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generation_equals_uncached(family):
    model = engram_model(family)
    ids, mask, _ = padded_batch([6, 6], seed=2)
    try:
        static = generate(model, ids, mask, True, cache_implementation="static")
    except ValueError as exc:  # e.g. Phi-3 on transformers 4.45: the model has no StaticCache support
        if "does not support" not in str(exc):
            raise
        pytest.skip(f"{family}: no StaticCache on transformers {transformers.__version__}")
    uncached = generate(model, ids, mask, False)
    assert torch.equal(static, uncached)
    beams = generate(model, ids, mask, True, cache_implementation="static", num_beams=2)
    assert torch.equal(beams, generate(model, ids, mask, False, num_beams=2))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_padded_rows_equal_unpadded_prompts(family, side):
    """Padding never enters an n-gram or the conv: each padded row's logits at its own
    positions equal those of the prompt alone (fp32, 1e-5), in a batch of mixed lengths."""
    model = engram_model(family)
    ids, mask, rows = padded_batch([9, 3, 6], side=side, seed=3)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=row[None]).logits[0]
            got = batch[i][mask[i].bool()]
            assert torch.allclose(got, alone, atol=1e-5), (i, (got - alone).abs().max())
        model.engram.enabled = False
        bare = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert (batch - bare)[mask.bool()].abs().max() > 1e-2, "the memory should act"


@pytest.mark.parametrize("family", ["llama", "mistral", "phi3"])
def test_left_padded_greedy_tokens_equal_each_prompt_alone(family):
    model = engram_model(family)
    ids, mask, rows = padded_batch([8, 3, 5], side="left", seed=4)
    batched = generate(model, ids, mask, True)[:, ids.shape[1]:]
    for i, row in enumerate(rows):
        alone = generate(model, row[None], torch.ones_like(row[None]), True)[:, row.numel():]
        assert torch.equal(batched[i], alone[0]), i


def test_padding_never_enters_the_memory():
    """Changing the ids under mask-0 positions changes nothing the memory reads."""
    model = engram_model("llama")
    ids, mask, _ = padded_batch([7, 4], side="left", seed=5)
    other = ids.clone()
    other[mask == 0] = 77
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        b = model(input_ids=other, attention_mask=mask, position_ids=positions(mask)).logits
    keep = mask.bool()
    assert torch.allclose(a[keep], b[keep], atol=1e-6)
