"""torch.compile of a transformers model with Engram memory (issue 14).

The failure the issue found on a GPU: a model compiled and run before `add_engram` kept
replaying its memory-less graph (torch.compile does not guard on module hooks), so the
memory silently never ran. These tests compile with dynamo's "eager" and "aot_eager" backends
(dynamo, and AOTAutograd as inductor uses it, without code generation: seconds on a CPU); the
bf16 tests use inductor (CPU code generation here, the GPU variant at the issue's size) under
bf16 autocast and compare with the fp32 step.
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
    # conv1d compiled too, so both runs take the same kernels ('auto' sums the conv's taps
    # in compiled code: the fused-regions tests compare those)
    add_engram(model, memory_size=5000, inject_layers=[1], freeze_base=False, slot_dim=8, heads_per_order=2, conv_impl="conv1d")
    open_memory(model)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    eager = step(model, ids, amp=True, mask=mask)
    got = step(torch.compile(model, backend="aot_eager"), ids, amp=True, owner=model, mask=mask)
    assert_same(eager, got, rtol=1e-5, atol=1e-7)  # aot_eager runs the same kernels: equal up to summation order
    assert "engram.blocks.1.table.weight" in got[1]


def test_compiled_training_with_tables_updated_in_backward_breaks_only_at_the_top(monkeypatch):
    """Tables updated in backward by a row-wise optimiser make row (sparse) gradients, which
    inductor cannot compile: each memory layer's read was a graph break inside its decoder
    layer's hook (on an H100, torch 2.11, such a step left the tables without gradient).
    The injector now reads them ahead, eagerly, at its one break before the forward: the
    model after it is one graph, no read happens inside it, and one step updates the
    tables (and the rest) as the eager step does."""
    import engram_core.tables.device_rows as device_rows
    from engram_core.tables.rowwise import RowwiseAdam

    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the packed path

    def trained(compile_with=None):
        model = qwen2(layers=4)
        torch.manual_seed(1)
        add_engram(model, memory_size=5000, inject_layers=[1, 2], freeze_base=False, slot_dim=8, heads_per_order=2)
        open_memory(model)
        tables = [b.table.weight for b in model.engram.blocks.values()]
        optimizer = RowwiseAdam(tables, lr=1e-2, fused_backward=True)
        run = torch.compile(model, backend=compile_with) if compile_with else model
        loss = run(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        optimizer.step()
        return float(loss), [t.detach().clone() for t in tables], optimizer

    loss_eager, tables_eager, _ = trained()
    graphs = []

    def counting_backend(gm, example_inputs):  # each graph run as traced (autograd as eager)
        graphs.append(gm)
        return gm.forward

    def no_read_inside(*args):
        raise AssertionError("a table was read inside the compiled forward")

    monkeypatch.setattr(device_rows, "read_rows_eagerly", no_read_inside)
    try:
        loss_compiled, tables_compiled, optimizer = trained(counting_backend)
    finally:
        torch.compiler.reset()
    assert optimizer.updates_in_backward
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-6)
    for got, want in zip(tables_compiled, tables_eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the bookkeeping's break, then the model: 1 graph on transformers 5.25, 5 on 4.45 (its
    # own breaks); 16 on 5.25 while each memory layer's read broke the graph
    assert len(graphs) < 8, len(graphs)


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


def assert_as_close_to_fp32(reference, eager, got, factor: float, floor: float = 1e-2):
    """Under bf16 autocast the memory's gradients are ill-conditioned: the context gate's
    signed square root has the derivative 1/(2√|s|), which amplifies rounding where the score
    is near 0, so eager bf16 itself is far from fp32 (0.2-0.3 in relative norm on the tables,
    benchmarks/engram_bf16_compile.py) and two bf16 graphs that round differently disagree as
    much. The test a compiler must pass is therefore not "equal to eager bf16" but "as close
    to fp32 as eager bf16 is": each tensor's distance to the fp32 step at most `factor` times
    eager bf16's (or `floor`, a few bf16 epsilons, where eager bf16 is closer than that)."""
    for name, ref, e, g in [("logits", reference[0], eager[0], got[0])] + [
        (n, reference[1][n], eager[1][n], got[1][n]) for n in reference[1]
    ]:
        d_got, d_eager = _distance(ref, g), _distance(ref, e)
        assert d_got <= factor * max(d_eager, floor), f"{name}: compiled bf16 {d_got:.3g} from fp32, eager bf16 {d_eager:.3g}"


def _distance(ref, x) -> float:
    return float((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def _bf16_triple(layers, vocab, rows, device, **kw):
    model = qwen2(layers=layers, vocab=vocab, device=device)
    add_engram(model, memory_size=rows, inject_layers=[1, min(12, layers - 1)], freeze_base=False, slot_dim=64, heads_per_order=8,
               fuse="off", **kw)  # the reference runs eagerly: no compiled regions inside it
    open_memory(model)
    ids = torch.randint(3, vocab, (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
    reference = step(model, ids, amp=False)
    eager = step(model, ids, amp=True)
    got = step(torch.compile(model), ids, amp=True, owner=model)
    assert {f"engram.blocks.{k}.table.weight" for k in model.engram.blocks} <= got[1].keys()
    return reference, eager, got


def test_inductor_bf16_is_as_close_to_fp32_as_eager_bf16():
    """Inductor (CPU code generation) under bf16 autocast, 4 layers: the compiled step's
    logits and gradients are as close to the fp32 step as eager bf16's (at most 4x as far;
    the worst here is about 1.3x, at 14 layers on the CPU about 3.2x, on attention biases)."""
    assert_as_close_to_fp32(*_bf16_triple(4, 151_936, 10**5, "cpu"), factor=4.0)


@cuda
@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_gpu_compiled_equals_eager_inductor_bf16(kernels):
    """The issue's setting at small width: 14 layers, memory after 1 and 12, Qwen2's
    vocabulary, inductor, bf16 autocast; the Triton operators inside the compiled graph.
    Compared with the fp32 step, not with eager bf16 (`assert_as_close_to_fp32` says why)."""
    assert_as_close_to_fp32(*_bf16_triple(14, 151_936, 10**6, "cuda", kernels=kernels), factor=4.0)
