"""torch.compile of a transformers model with Engram memory (issue 14).

The failure the issue found on a GPU: a model compiled and run before `add_engram` kept
replaying its memory-less graph (torch.compile does not guard on module hooks), so the
memory silently never ran. These tests compile with dynamo's "eager" and "aot_eager" backends
(dynamo, and AOTAutograd as inductor uses it, without code generation: seconds on a CPU); the GPU variant uses
inductor under bf16 autocast.
"""

import pytest
import torch
import transformers
from engram_llm_hash import add_engram

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def qwen2(layers=3, vocab=1000, device="cpu"):
    """Qwen2's structure at toy width: tied embeddings, GQA, a vocabulary larger than the width."""
    conf = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(conf).to(device)


def open_memory(model):
    """A memory that visibly changes the output (the default context gate is half open,
    the value projection is what makes the difference large enough to see)."""
    with torch.no_grad():
        for block in model.engram.blocks.values():
            block.value_proj.weight.normal_(std=0.5)
            block.conv.weight.normal_(std=0.3)


def step(model, ids, amp=None, owner=None, mask=None):
    """Logits and gradients (named as in `owner`, the uncompiled model) of one step."""
    owner = owner or model
    for p in owner.parameters():
        p.grad = None
    ctx = torch.autocast(ids.device.type, dtype=torch.bfloat16) if amp else torch.autocast(ids.device.type, enabled=False)
    with ctx:
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in owner.named_parameters() if p.grad is not None}
    return out.logits.detach().float(), grads


def assert_near(a, b, tol):
    """Under bf16 autocast the two graphs round differently: each tensor (logits, every
    gradient) within `tol` of eager's in relative norm, which elementwise tolerances on
    gradients of 1e-5 scale would not test."""
    logits_a, grads_a = a
    logits_b, grads_b = b
    assert grads_a.keys() == grads_b.keys()
    for name, x, y in [("logits", logits_a, logits_b)] + [(n, grads_a[n], grads_b[n]) for n in grads_a]:
        err = float((y.float() - x.float()).norm() / x.float().norm().clamp_min(1e-30))
        assert err < tol, f"{name}: relative error {err:.3g}"


def assert_same(a, b, rtol, atol):
    logits_a, grads_a = a
    logits_b, grads_b = b
    torch.testing.assert_close(logits_b, logits_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=rtol, atol=atol, msg=n)


@pytest.mark.parametrize("what", ["model", "decoder"])
def test_memory_added_after_the_first_compiled_call_runs(what):
    """Compiled and run before the memory exists, as the issue's benchmark did (base
    first, then `add_engram` on the same model). torch.compile does not guard on module
    hooks, so a graph of the model's forward (`what = "model"`: reached where the memory's
    wrapper of `model.forward` breaks the graph before calling it) or of the decoder stack
    (`"decoder"`: `model.model.compile()`) made before `add_engram` kept running without
    the memory. `add_engram`/`remove_engram` now drop compiled graphs."""
    model = qwen2(layers=2)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    if what == "model":  # dynamo's own "eager" backend: the fault is in dynamo's caching, and this is fastest
        compiled = torch.compile(model, backend="eager")
    else:
        model.get_decoder().compile(backend="eager")
        compiled = model
    base = step(compiled, ids, owner=model, mask=mask)
    add_engram(model, memory_size=5000, inject_layers=[0, 1], freeze_base=False, slot_dim=8, heads_per_order=2)
    open_memory(model)
    eager = step(model, ids, mask=mask) if what == "model" else None
    got = step(compiled, ids, owner=model, mask=mask)
    assert not torch.allclose(got[0], base[0])  # the memory runs under compile
    for key in model.engram.blocks:
        assert f"engram.blocks.{key}.table.weight" in got[1], "no gradient reached the table"
    if eager is not None:
        assert_same(eager, got, rtol=1e-5, atol=1e-6)
    model.remove_engram()
    torch.testing.assert_close(step(compiled, ids, owner=model, mask=mask)[0], base[0], rtol=1e-5, atol=1e-6)  # and stops once removed


def test_compiled_equals_eager_with_padding_and_autocast():
    model = qwen2(layers=2)
    add_engram(model, memory_size=5000, inject_layers=[1], freeze_base=False, slot_dim=8, heads_per_order=2)
    open_memory(model)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    eager = step(model, ids, amp=True, mask=mask)
    got = step(torch.compile(model, backend="aot_eager"), ids, amp=True, owner=model, mask=mask)
    assert_same(eager, got, rtol=1e-5, atol=1e-7)  # aot_eager runs the same kernels: equal up to summation order
    assert "engram.blocks.1.table.weight" in got[1]


def test_memory_forward_has_no_host_synchronisation():
    """fullgraph=True fails on any graph break: a .tolist(), an .item(), a data-dependent
    branch (all host synchronisations on a GPU) in the memory's forward, padded or not."""
    model = qwen2(layers=2)
    add_engram(model, memory_size=5000, inject_layers=[1], slot_dim=8, heads_per_order=2)
    block = model.engram.blocks["1"]
    hidden = torch.randn(2, 12, 32)
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0
    forward = torch.compile(block.forward, fullgraph=True, backend="eager")
    for m in (None, mask):
        torch.testing.assert_close(forward(hidden, ids, m), block(hidden, ids, m))
        torch.testing.assert_close(forward(hidden[:, -1:], ids, m), block(hidden[:, -1:], ids, m))  # a decode step


@cuda
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_gpu_compiled_equals_eager_inductor_bf16(kernels):
    """The issue's setting at small width: 14 layers, memory after 1 and 12, Qwen2's
    vocabulary, inductor, bf16 autocast; the Triton operators inside the compiled graph."""
    model = qwen2(layers=14, vocab=151_936, device="cuda")
    add_engram(model, memory_size=10**6, inject_layers=[1, 12], freeze_base=False, slot_dim=64, heads_per_order=8, kernels=kernels)
    open_memory(model)
    ids = torch.randint(3, 151_936, (2, 256), device="cuda")
    eager = step(model, ids, amp=True)
    got = step(torch.compile(model), ids, amp=True, owner=model)
    assert {"engram.blocks.1.table.weight", "engram.blocks.12.table.weight"} <= got[1].keys()
    assert_near(eager, got, tol=3e-2)
