"""add_engram under generate: greedy, seeded sampling, beam search, StaticCache, padding.

Every comparison uses trained (non-zero, large) memory, so a wrong history would change
tokens. Five tiny random families: Llama, Qwen2, Mistral, Gemma-style, Phi-3-style.
"""

import inspect

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


def test_cached_step_hands_the_memory_a_fixed_window():
    """A KV-cached step hashes the new token and the `reach` ids before it, not the history:
    the memory sees 1 + reach columns at every decode step, the whole prompt at prefill."""
    model = engram_model("llama")
    reach = model.engram.reach
    seen = []
    model.engram.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[1].shape)))
    ids = torch.randint(3, 100, (2, 3 * reach), generator=torch.Generator().manual_seed(4))
    generate(model, ids, None, True)
    layers = len(model.engram.blocks)
    assert seen[:layers] == [(2, 3 * reach)] * layers
    assert set(seen[layers:]) == {(2, 1 + reach)}, seen
    assert len(seen) == 8 * layers


def test_window_keeps_the_whole_history_where_padding_follows_real_tokens():
    """Only padding on the left can be dropped with the history before the window; a row
    with real tokens before padding inside the window is handed whole (checked on a CPU)."""
    model = engram_model("llama")
    injector = model._engram_injector
    reach = model.engram.reach
    ids = torch.randint(3, 100, (2, 2 * reach), generator=torch.Generator().manual_seed(5))
    left = torch.ones_like(ids)
    left[0, : reach + 3] = 0
    got_ids, got_mask = injector._memory_window(ids, left, 1)
    assert got_ids.shape[1] == 1 + reach and torch.equal(got_mask, left[:, -(1 + reach):])
    middle = torch.ones_like(ids)
    middle[0, -3] = 0
    got_ids, got_mask = injector._memory_window(ids, middle, 1)
    assert torch.equal(got_ids, ids) and torch.equal(got_mask, middle)
    short_ids, short_mask = injector._memory_window(ids[:, :4], None, 1)  # a short history: padded on the left
    assert short_ids.shape[1] == 1 + reach and torch.equal(short_ids[:, -4:], ids[:, :4])
    assert short_mask[:, : reach - 3].sum() == 0 and bool(short_mask[:, -4:].all())


@pytest.mark.parametrize("family,rowwise,batch", [("llama", False, 2), ("qwen2", False, 1), ("qwen2", True, 2)])
def test_compiled_static_cache_decode_equals_uncached_without_recompiling(family, rowwise, batch):
    """torch.compile of the model decoding into a StaticCache: the memory's bookkeeping runs
    eagerly before the compiled region and the memory's window keeps one shape, so after the
    first decode steps nothing recompiles (torch.compiler's fail_on_recompile stance), and
    the greedy tokens are those of uncached generation. `rowwise`: ten layers, the tables
    held by a row-wise optimiser updating them in backward (what training leaves behind):
    a read without gradient stays in the graph; a break at each memory layer would split the
    model into per-layer frames that recompile on the cache's lazily built layers (seen on
    an H100 with a 24-layer model: dynamo's recompile limit, then eager). `batch` 1: the
    window of a single row is a slice of the growing history whose stride would change each
    token (dynamo guards strides) unless it is copied."""
    if rowwise:
        from engram_core.tables.rowwise import RowwiseAdam

        model = add_engram(tiny_model(family, layers=10), memory_size=5000, inject_layers=[1, 6], slot_dim=8)
        perturb(model.engram, 1.0)
        optimizer = RowwiseAdam([b.table.weight for b in model.engram.blocks.values()], fused_backward=True)  # noqa: F841 - holds the tables
    else:
        model = engram_model(family)
    prompt = torch.randint(3, 100, (batch, 20), generator=torch.Generator().manual_seed(6))
    seq = prompt
    with torch.no_grad():  # greedy by whole-sequence forwards, no cache (plain argmax: no logits processors)
        for _ in range(8):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    reference = seq[:, prompt.shape[1]:]
    graphs = []

    def counting_backend(gm, example_inputs):  # a torch.compile backend that runs each graph as traced
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=counting_backend, dynamic=False)
    sized = "batch_size" in inspect.signature(transformers.StaticCache.__init__).parameters  # transformers < 5 sizes the batch
    cache = transformers.StaticCache(config=model.config, max_cache_len=40, **({"batch_size": prompt.shape[0]} if sized else {}))
    tokens = []
    try:
        with torch.no_grad():
            out = compiled(input_ids=prompt, past_key_values=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
            for step in range(7):
                if step == 2:  # prefill and the first decode step compiled: nothing more may
                    torch.compiler.set_stance("fail_on_recompile")
                out = compiled(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
                tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    finally:
        torch.compiler.set_stance("default")
        torch.compiler.reset()
    assert torch.equal(torch.cat(tokens, 1), reference)
    # the prefill and the decode step, split only by the bookkeeping's break and the
    # library's own (2 graphs on transformers 5.25, 6 on 4.45); a break at every memory
    # layer split the ten-layer model into per-layer frames (23 graphs on 5.25)
    assert len(graphs) < 8, len(graphs)


@pytest.mark.parametrize("mode", ["greedy", "beam3"])
def test_long_cached_generation_through_the_window_equals_uncached(mode):
    """Histories far longer than the window (1 + reach ids), left-padded rows of mixed
    lengths: most steps read through the window, and the tokens are still uncached ones."""
    model = engram_model("qwen2")
    ids, mask, _ = padded_batch([20, 9], side="left", seed=7)
    opts = dict(MODES[mode], max_new_tokens=24, min_new_tokens=24, pad_token_id=PAD)
    assert ids.shape[1] + 24 > 3 * (1 + model.engram.reach)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **opts)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **opts)
    assert torch.equal(cached, uncached)
